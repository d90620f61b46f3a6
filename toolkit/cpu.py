"""How a process uses the CPU it runs on: its share of the cores, and what its allocator (glibc's, or
a preloaded jemalloc) does with freed memory. Nothing here is distributed; on a GPU machine it changes nothing."""

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
    """How the allocator treats large freed blocks on CPU, chosen by what the strategy is for.

    By default glibc returns blocks above a moving threshold (up to 32 MB) to the OS, and the next
    step faults the same sizes in again page by page: the logits, the embedding's gradient, ...
    (measured at opt-125m: 0.6 s of a 7 s step). Where every rank holds the whole model (one
    process, DDP, ZeRO-1/2) the working set is the same every step, so the heap keeps it (as the
    jemalloc/tcmalloc preloads of PyTorch's CPU performance guide do). Where parameters are
    sharded (ZeRO-3, FSDP), memory is what the strategy is for, and layer after layer is gathered
    and freed: blocks over 128 KiB (glibc's initial threshold, kept fixed) go back to the OS at
    once, so a rank holds its shard and the layer at work, not the high-water mark of every
    transient (random-opt-125m, ZeRO-3, 2 ranks: 1.25 GB resident for 1.17 GB of model-state
    tensors; 2.0 GB with glibc's moving threshold, 2.9 GB with the heap kept). A launch that
    preloads jemalloc keeps blocks without glibc's fragmentation, set once the model is built:
    `allocator_for_the_loop`."""
    if torch.cuda.is_available() or jemalloc_loaded():
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


def jemalloc_loaded() -> bool:
    """Whether this process allocates with jemalloc (`LD_PRELOAD=.../libjemalloc.so.2` at launch)."""
    return hasattr(ctypes.CDLL(None), "mallctl")


def _mallctl(name: str, read=None, write=None):
    """jemalloc's control interface: read a value of ctypes type `read`, or write the ctypes value `write`."""
    old, old_size = (read(), ctypes.c_size_t(ctypes.sizeof(read))) if read else (None, None)
    new_size = ctypes.sizeof(write) if write is not None else 0
    pointer = lambda value: None if value is None else ctypes.byref(value)  # noqa: E731
    if ctypes.CDLL(None).mallctl(name.encode(), pointer(old), pointer(old_size), pointer(write),
                                 ctypes.c_size_t(new_size)):
        raise OSError(f"jemalloc refused mallctl {name!r}")
    return old.value if read else None


def keep_freed_blocks(big_only: bool) -> int:
    """Under jemalloc, keep freed blocks for reuse: all of them, or (`big_only`) those too big for its
    ordinary arenas. Returns that size.

    jemalloc serves blocks over `opt.oversize_threshold` (8 MiB) from an arena of their own, created on
    first use, that returns them to the OS at once ("less immediate reuse is expected" of them); its
    other arenas return what is freed over a 10 s decay. Where every rank holds the whole model, the
    working set is the same every step and every arena keeps it, as glibc is told to above but
    without glibc's fragmentation (random-opt-125m, 2 ranks, in turns with DDP under glibc: DDP 1.03x,
    ZeRO-2 0.88x against 0.69x under glibc). Under FSDP and ZeRO-3 the big blocks are the same every
    step (each gathered layer, its gradients, the logits chunk), so that arena keeps them while smaller
    blocks still go back: fsdp 0.82x and zero3 0.70x of DDP's tokens/s (0.58x and 0.55x with glibc
    returning blocks); at random-opt-350m 3.67 and 3.62 GB per rank in training (3.33 and 3.44).
    MALLOC_CONF sets every arena alike, hence the arena is created here and then told never to decay."""
    threshold = _mallctl("opt.oversize_threshold", read=ctypes.c_size_t)
    if not threshold:
        raise OSError("no arena for big blocks: MALLOC_CONF oversize_threshold:0")
    big_blocks_arena = _mallctl("opt.narenas", read=ctypes.c_uint)  # its index: after the automatic ones
    torch.empty(threshold + 1, dtype=torch.uint8)  # allocated and freed: creates that arena
    never = ctypes.c_ssize_t(-1)
    if not big_only:
        _mallctl("arenas.dirty_decay_ms", write=never)  # the arenas created from now on
    for arena in [big_blocks_arena] if big_only else range(big_blocks_arena + 1):
        try:
            _mallctl(f"arena.{arena}.dirty_decay_ms", write=never)
        except OSError:
            if big_only:
                raise
            # an automatic arena not created yet: it will be, with the default set above
    return threshold


def allocator_for_the_loop(shards_parameters: bool) -> dict:
    """Right before the loop: give back what building, loading and sharding freed (a whole model's worth
    under ZeRO-3). Under jemalloc, from then on keep freed blocks for the loop (`keep_freed_blocks`), and
    say so (`runtime.cpu_allocator`): kept only from here, since while a model is built its blocks are freed
    once and never asked for again (random-opt-1.3b, ZeRO-3 + 8-bit Adam, 2 ranks: 9.0 GB per rank at
    start when kept from the launch on, 6.2 when kept from here, as under glibc)."""
    if not jemalloc_loaded():
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        return {}
    _mallctl("arena.4096.purge")  # 4096: MALLCTL_ARENAS_ALL
    try:
        threshold = keep_freed_blocks(big_only=shards_parameters)
    except OSError as refused:  # a jemalloc before 5.2, or a MALLOC_CONF without that arena: as it is
        return {"cpu_allocator": f"jemalloc ({refused})"}
    return {"cpu_allocator": "jemalloc, keeps freed blocks"
                             + (f" over {threshold / 2**20:g} MiB" if shards_parameters else "")}
