"""How a process uses the CPU it runs on: its share of the cores, and what glibc does with freed
memory. Nothing here is distributed; on a GPU machine it changes nothing."""

from __future__ import annotations

import ctypes
import os

import torch


def use_cpu_share(requested: int = 0) -> dict:
    """On CPU, compute with this process's share of the machine: its usable cores divided by the
    processes on this machine. `accelerate launch` sets OMP_NUM_THREADS=1 in every process it starts,
    a lone one too, so without this one core of two sits idle. A thread count the user chose
    (`requested`, from train.cpu_threads, or OMP_NUM_THREADS above 1) wins. On GPU nothing changes."""
    if torch.cuda.is_available():
        return {}
    omp = int(os.environ.get("OMP_NUM_THREADS") or 0)
    if requested:
        threads, source = requested, "train.cpu_threads"
    elif omp > 1:
        threads, source = omp, "OMP_NUM_THREADS"
    else:
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        threads, source = max(1, len(os.sched_getaffinity(0)) // local_processes), "cores / local processes"
    torch.set_num_threads(threads)
    return {"cpu_threads": threads, "cpu_threads_from": source}


def tune_cpu_allocator(shards_parameters: bool) -> dict:
    """How glibc treats large freed blocks on CPU, chosen by what the strategy is for.

    By default glibc returns blocks above a moving threshold (up to 32 MB) to the OS, and the next
    step faults the same sizes in again page by page: the logits, the embedding's gradient, ...
    (measured at opt-125m: 0.6 s of a 7 s step). Where every rank holds the whole model (one
    process, DDP, ZeRO-1/2) the working set is the same every step, so the heap keeps it (as the
    jemalloc/tcmalloc preloads of PyTorch's CPU performance guide do). Where parameters are
    sharded (ZeRO-3, FSDP), memory is what the strategy is for, and layer after layer is gathered
    and freed: blocks over 128 KiB (glibc's initial threshold, kept fixed) go back to the OS at
    once, so a rank holds its shard and the layer at work, not the high-water mark of every
    transient (random-opt-125m, ZeRO-3, 2 ranks: 1.25 GB resident for 1.17 GB of model-state
    tensors; 2.0 GB with glibc's moving threshold, 2.9 GB with the heap kept)."""
    if torch.cuda.is_available():
        return {}
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return {"cpu_allocator": "default"}  # not glibc
    m_trim_threshold, m_mmap_threshold, m_mmap_max = -1, -3, -4  # <malloc.h>
    if shards_parameters:
        libc.mallopt(m_mmap_threshold, 2**17)  # set, so glibc no longer raises it
        return {"cpu_allocator": "return blocks over 128 KiB"}
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)
    return {"cpu_allocator": "keep freed blocks"}


def release_freed_memory() -> None:
    """Give back what building, loading and sharding freed (a whole model's worth under ZeRO-3),
    before the loop."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
