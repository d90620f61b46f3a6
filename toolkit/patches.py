"""Every place the toolkit reaches into a library's internals, in one module: what it relies on,
and the versions it was written for (and tested with: constraints.txt, and the newest releases in
pyproject's ranges through `make test-latest`). tests/test_patches.py checks in the fast tier that
each internal is still there and still does what the patch expects, so a release that moves one
fails there, not in a user's run.

- `run_fsdp_on_cpu`: accelerate's `PartialState._shared_state["distributed_type"]`, which
  `AcceleratorState` reads (accelerate 1.10-1.16);
- `enable_cpu_fp16`: accelerate's `Accelerator.native_amp` and `.scaler`, which its `__init__` sets
  for GPUs only and its `prepare` / `backward` / optimizer step use (accelerate 1.10-1.16);
- `share_zero3_fp32_partitions`: DeepSpeed's `DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions`
  and its `self.device` (deepspeed 0.17-0.19);
- `count_overflows_at_the_floor`: DeepSpeed's `DynamicLossScaler.raise_error_at_min_scale` and
  `min_scale` (deepspeed 0.17-0.19);
- `step_unless`: torch's fused optimizers read a `found_inf` attribute, GradScaler's protocol
  (`_step_supports_amp_scaling`; torch 2.6-2.13).

Elsewhere, internals used as they are (no patch, but guarded the same way): accelerate's FSDP2
helpers `fsdp2_prepare_model` / `fsdp2_apply_ac` and plugin fields (strategy/fsdp.py),
`DeepSpeedPlugin.set_deepspeed_weakref` (strategy/__init__.py), torch's `torch.ops.c10d` ops at
the Autograd dispatch key (comm.py).
"""

from __future__ import annotations

import functools

import torch
from accelerate.utils import DistributedType


def run_fsdp_on_cpu() -> None:
    """After `PartialState(cpu=True)` started gloo: let AcceleratorState see a multi-device type,
    for which alone it turns on FSDP (and replaces this value with DistributedType.FSDP as it does).
    Without it, an FSDP config on a machine without a GPU runs each process alone, unsharded."""
    from accelerate import PartialState

    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU


def enable_cpu_fp16(accelerator) -> None:
    """accelerate turns on fp16 autocast and loss scaling only off CPU, and would silently train
    "fp16" in fp32; torch has both on CPU, so switch them on the way accelerate does on GPU
    (before `prepare`, which wraps the model's forward in autocast when `native_amp` is set)."""
    if (accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu"
            and accelerator.distributed_type != DistributedType.DEEPSPEED):
        accelerator.native_amp = True
        # torch's GradScaler works on CPU and on FSDP2's DTensor gradients alike
        accelerator.scaler = torch.amp.GradScaler("cpu")


def share_zero3_fp32_partitions() -> None:
    """ZeRO-3 with fp32 parameters: let the optimizer update the parameter partitions in place
    instead of a second fp32 copy of them, as DeepSpeed means to.

    DeepSpeed 0.19's stage 3 skips the copy when the partition already has the master dtype and
    device, but compares `tensor.device == self.device` with `self.device` a string ('cpu',
    'cuda:0'), which a torch.device never equals: every rank then holds a needless 4 bytes per
    parameter / N (0.62 GB per rank at random-opt-350m on 2 ranks, a fifth of its model states).
    This makes `self.device` a torch.device for that one call. With bf16/fp16 parameters or
    optimizer offload the dtypes or branches differ and nothing changes."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    create = Stage3._create_fp32_partitions
    if getattr(create, "compares_devices", False):
        return

    @functools.wraps(create)
    def create_comparing_devices(self):
        device = self.device
        if isinstance(device, str) and not self.offload_optimizer:
            self.device = torch.device(device)
        try:
            return create(self)
        finally:
            self.device = device

    create_comparing_devices.compares_devices = True
    Stage3._create_fp32_partitions = create_comparing_devices


def count_overflows_at_the_floor(zero_optimizer) -> float:
    """DeepSpeed's loss scaler raises a bare Exception (a traceback) when it overflows at its
    floor; the toolkit counts that as a bad step instead (guard.py), so the run ends with the
    one-line divergence error. Returns the floor."""
    scaler = zero_optimizer.loss_scaler
    scaler.raise_error_at_min_scale = False
    return scaler.min_scale


def step_unless(optimizer, skip: torch.Tensor) -> None:
    """`optimizer.step()`, skipped where the device flag `skip` is set. torch's fused optimizers take
    such a flag as GradScaler hands it to them (`found_inf`: the update is skipped on the device), so
    the host does not wait for the device to decide; others (bitsandbytes) are told on the host."""
    inner = optimizer
    while hasattr(inner, "optimizer"):
        inner = inner.optimizer
    if getattr(inner, "_step_supports_amp_scaling", False):
        inner.found_inf = skip.float()
        try:
            optimizer.step()
        finally:
            del inner.found_inf
    elif not skip.item():
        optimizer.step()
