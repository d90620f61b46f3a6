"""What the run measures of itself: its model's FLOPs and the device's peak (MFU), the tokens in a
batch, memory (peak resident or allocated), and its model's and optimizer's sizes. telemetry.py
reports these."""

from __future__ import annotations

import importlib.metadata
import re
import resource
import sys
import time
from pathlib import Path

import torch

from .config import RunConfig

# --- FLOPs, for MFU ---------------------------------------------------------------------------------


def model_flops(model) -> dict:
    """Training FLOPs per token, PaLM's way (appendix B): a matmul with a weight costs 2 FLOPs per
    weight element per token forward and 4 backward (gradients of the input and of the weight), so
    6 per trainable parameter; a frozen one (LoRA's base) needs no weight gradient: 4. Attention
    scores and values add 12 * layers * hidden per token per position of context.

    Parameters counted: all but the position embeddings (a lookup). The token embedding counts once,
    for the output projection tied to it (a real vocab x hidden matmul per token). Recomputation
    under activation checkpointing is not counted (MFU, not hardware FLOPs utilization)."""
    trainable = frozen = 0
    for name, p in model.named_parameters():  # each tied tensor once
        if "embed_positions" in name:
            continue
        numel = getattr(p, "ds_numel", p.numel())  # ZeRO-3 placeholders are empty; FSDP2 DTensors report the full size
        if p.requires_grad:
            trainable += numel
        else:
            frozen += numel
    config = model.config
    return {"flops_per_token": 6 * trainable + 4 * frozen,
            "attention_flops_per_token_per_position": 12 * config.num_hidden_layers * config.hidden_size}


# Dense peak TFLOP/s per GPU: (bf16/fp16 tensor cores, fp32), from the vendors' data sheets.
GPU_PEAK_TFLOPS = [
    (r"H100", (989.0, 67.0)),
    (r"A100", (312.0, 19.5)),
    (r"V100", (125.0, 15.7)),
    (r"A10G", (125.0, 31.2)),
    (r"\bL4\b", (121.0, 30.3)),
    (r"RTX 4090", (165.0, 82.6)),
    (r"\bT4\b", (65.0, 8.1)),
]


def peak_flops(accelerator, cfg: RunConfig, mixed_precision: str) -> dict:
    """Peak TFLOP/s of one process's device, the denominator of MFU, and where it comes from:
    train.peak_tflops, else the GPU table, else the best rate of a short matmul probe (on CPU: fp32,
    with this process's threads). Measured once, by the main process only (the others return {})."""
    if not accelerator.is_main_process:
        return {}
    half = mixed_precision in ("bf16", "fp16")
    if cfg.train.peak_tflops > 0:
        return {"peak_tflops": cfg.train.peak_tflops, "peak_tflops_source": "train.peak_tflops"}
    device = accelerator.device
    if device.type == "cuda" and gpu_peak_tflops(torch.cuda.get_device_name(device), half):
        name = torch.cuda.get_device_name(device)
        return {"peak_tflops": gpu_peak_tflops(name, half),
                "peak_tflops_source": f"table: {name}, {'bf16/fp16' if half else 'fp32'} dense"}
    # CPU, or a GPU the table does not know: measure. On a GPU that is a floor, not the data-sheet
    # peak (set train.peak_tflops); on CPU it is what the cores really do with fp32 matmuls.
    dtype = torch.bfloat16 if half and device.type != "cpu" else torch.float32
    n = 1024 if device.type == "cpu" else 8192
    tflops = matmul_tflops(device, dtype, n)
    where = f"{torch.get_num_threads()} thread(s)" if device.type == "cpu" else torch.cuda.get_device_name(device)
    return {"peak_tflops": round(tflops, 4),
            "peak_tflops_source": f"measured: best {n}x{n} {str(dtype).removeprefix('torch.')} matmul, "
                                  f"{device.type}, {where}"}


def gpu_peak_tflops(device_name: str, half: bool) -> float | None:
    for pattern, (half_peak, fp32_peak) in GPU_PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return half_peak if half else fp32_peak
    return None


def matmul_tflops(device, dtype=torch.float32, n: int = 1024, seconds: float = 0.3) -> float:
    """The best rate of n x n matmuls over about `seconds`: the best, not the mean, so a moment of
    contention from other processes on the machine lowers it as little as possible."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b  # warm up: first-call allocation and kernel selection
    sync()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        sync()
        best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best / 1e12


def count_tokens(batch: dict) -> tuple[torch.Tensor, int]:
    """(real tokens: positions with attention_mask 1, all input positions incl. padding) of a batch.
    The real count stays a tensor on the batch's device: counting never waits for the GPU. (Packed
    rows for flash-attention carry no mask: their few padding positions count as real.)"""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    if mask is not None and mask.ndim == 4:  # packed rows (data.Collator.packed): real tokens attend to themselves
        mask = mask.diagonal(dim1=-2, dim2=-1)
        if mask.is_floating_point():  # eager's additive mask: 0 where a token attends
            mask = mask == 0
    real = mask.sum() if mask is not None else torch.tensor(ids.numel(), device=ids.device)
    return real, ids.numel()


# --- memory -----------------------------------------------------------------------------------------


def peak_memory_gb() -> float:
    """Peak accelerator memory of this process, or its peak resident memory on CPU, since the
    last `reset_peak_memory` (MemoryAtStart resets it as training begins)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    try:  # Linux: VmHWM, which reset_peak_memory resets (getrusage's ru_maxrss it does not)
        status = Path("/proc/self/status").read_text()
    except OSError:  # not Linux: the peak since the process started (macOS reports bytes)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**30 if sys.platform == "darwin" else 2**20)
    return int(status.split("VmHWM:")[1].split()[0]) / 2**20  # kB


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:  # Linux: "5" resets the process's peak resident set size (VmHWM, not getrusage's ru_maxrss)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # then each peak counts from the start of the process


def peak_per_rank(accelerator) -> list[float]:
    """All ranks: `peak_memory_gb` of rank 0, 1, ..."""
    mine = torch.tensor([peak_memory_gb()], dtype=torch.float64, device=accelerator.device)
    return [round(v, 3) for v in accelerator.gather(mine).cpu().tolist()]


class MemoryAtStart:
    """What each rank holds before training, phase by phase: the peak while the model is built
    and placed (the whole model on every rank, unless the strategy builds it sharded), then the
    peak through `prepare` (optimizer state, buffers) until the first step. From then on
    `peak_memory_gb` counts the training alone."""

    def __init__(self):
        self.phases = {"before_model": memory_now_gb()}
        reset_peak_memory()

    def mark(self, phase: str) -> None:
        self.phases[phase] = peak_memory_gb()
        reset_peak_memory()

    def per_rank(self, accelerator) -> dict:
        """All ranks: {phase: [GB of rank 0, rank 1, ...]}."""
        mine = torch.tensor(list(self.phases.values()), dtype=torch.float64, device=accelerator.device)
        ranks = accelerator.gather(mine).view(accelerator.num_processes, -1).cpu()
        return {phase: [round(v, 3) for v in ranks[:, i].tolist()] for i, phase in enumerate(self.phases)}


def memory_now_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 2**30
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:  # not Linux
        return peak_memory_gb()
    return int(status.split("VmRSS:")[1].split()[0]) / 2**20  # kB


# --- the model and the optimizer --------------------------------------------------------------------


def sharded_numel(model) -> tuple[int, int]:
    """(elements of parameters held by this rank, elements of the full model)."""
    local = full = 0
    for p in model.parameters():
        if hasattr(p, "ds_numel"):  # ZeRO-3: `p` is an empty placeholder, the shard is ds_tensor
            full += p.ds_numel
            local += p.ds_tensor.numel()
        else:  # FSDP2 shards are DTensors
            full += p.numel()
            local += p.to_local().numel() if hasattr(p, "to_local") else p.numel()
    return local, full


def trainable_numel(model) -> int:
    """Elements of the parameters that train (all of them, or only the LoRA adapters)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)


def parameter_dtypes(model) -> dict:
    """The dtypes the parameters are held in, trained and frozen (LoRA's base; uint8: packed 4-bit)."""
    held = {"trainable": set(), "frozen": set()}
    for p in model.parameters():
        held["trainable" if p.requires_grad else "frozen"].add(str(p.dtype).removeprefix("torch."))
    return {kind: sorted(dtypes) for kind, dtypes in held.items()}


def parameter_bytes(model) -> int:
    """Bytes of the parameters this process holds (its partition under ZeRO-3, its shard under FSDP)."""
    total = 0
    for p in model.parameters():
        local = p.ds_tensor if hasattr(p, "ds_tensor") else p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total


def innermost(optimizer):
    """The optimizer that updates the weights, under accelerate's and DeepSpeed's wrappers."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def optimizer_state_size(optimizer) -> tuple[int, int]:
    """(elements, bytes) of optimizer state held by this rank, under any wrapper or sharding."""
    numel = nbytes = 0
    for state in innermost(optimizer).state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.ndim > 0:  # skip scalar step counters
                value = value.to_local() if hasattr(value, "to_local") else value
                numel += value.numel()
                nbytes += value.numel() * value.element_size()
    return numel, nbytes


def optimizer_stats(optimizer) -> dict:
    """This rank's optimizer state, under any wrapper or sharding."""
    numel, nbytes = optimizer_state_size(optimizer)
    return {"optim_state_numel": numel, "optim_state_mb": round(nbytes / 2**20, 4)}


def compute_dtype_probe(model) -> dict:
    """{"compute_dtype": ...}, filled by the next forward pass with the dtype the first linear layer
    really computes in (autocast, DeepSpeed or FSDP mixed precision decide it, not the weights)."""
    seen: dict = {}
    layer = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))

    def record(module, inputs, output):
        seen["compute_dtype"] = str(output.dtype).removeprefix("torch.")
        handle.remove()

    handle = layer.register_forward_hook(record)
    return seen


def versions() -> dict:
    names = ("toolkit", "torch", "accelerate", "transformers", "datasets", "deepspeed", "peft", "bitsandbytes")
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found
