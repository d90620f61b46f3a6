"""Whether an optimizer step happens, and when a run has diverged.

fp16: the loss scaler decides. torch's GradScaler (inside accelerate's `optimizer.step()`) or
DeepSpeed's (inside `accelerator.backward`) skips a step whose scaled gradients overflowed and
lowers the scale. That is normal - a GPU run starts at a scale of 2^16 and finds its level in the
first steps - not a bad step. A step is bad when the loss itself is not finite, or when it overflowed
with the scale already at its floor (`train.min_loss_scale`, DeepSpeed's `fp16.min_loss_scale`).
bf16 and fp32: a step whose loss or gradient norm is not finite is skipped, and is bad.
`train.max_bad_steps` bad steps in a row end the run.

The bookkeeping stays on the device, so on a GPU the host can run ahead of it: the loop reads it
(`read`) only on the steps it logs or saves. fp16 reads the scaler's verdict every step, because
whether the LR schedule advances depends on it.
"""

from __future__ import annotations

import torch
from accelerate.utils import DistributedType

from . import patches


class StepGuard:
    def __init__(self, accelerator, optimizer, min_loss_scale: float):
        self.grad_scaler = accelerator.scaler  # torch's GradScaler: fp16 under one process, DDP or FSDP
        self.deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        self.zero_optimizer = optimizer.optimizer if self.deepspeed and model_fp16(accelerator) else None
        if self.zero_optimizer is not None:  # its own floor, at which it must not raise
            min_loss_scale = patches.count_overflows_at_the_floor(self.zero_optimizer)
        self.min_loss_scale = min_loss_scale
        self.scale = self._current_scale()
        device = accelerator.device
        self.in_a_row = torch.zeros((), dtype=torch.int64, device=device)  # bad steps up to the last one
        self.most_in_a_row = torch.zeros((), dtype=torch.int64, device=device)  # since the last read
        self.skipped = torch.zeros((), dtype=torch.bool, device=device)  # the last step
        self.loss_is_finite = torch.ones((), dtype=torch.bool, device=device)  # the last step's
        self.overflows = 0  # fp16: steps the scaler skipped since the last read

    @property
    def scales(self) -> bool:
        return self.scale is not None

    def _current_scale(self) -> float | None:
        if self.grad_scaler is not None:
            return self.grad_scaler.get_scale()
        if self.zero_optimizer is not None:
            return float(self.zero_optimizer.cur_scale)
        return None

    def step(self, optimizer, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> bool:
        """Step the optimizer unless this step must be skipped (`loss`: the step's loss summed over
        ranks; `grad_norm`: the global gradient norm). Returns whether the LR schedule advances."""
        loss, grad_norm = whole(loss), whole(grad_norm)
        loss_is_finite = torch.isfinite(loss)
        if not self.scales:
            skip = ~loss_is_finite if grad_norm is None else ~(loss_is_finite & torch.isfinite(grad_norm))
            if self.deepspeed:
                optimizer.step()  # a no-op: DeepSpeed stepped inside backward (docs/training-loop.md)
            else:
                patches.step_unless(optimizer, skip)
            self._count(skip, skip, loss_is_finite)
            return True
        before = self.scale
        optimizer.step()  # GradScaler skips an overflowing step and lowers the scale (under DeepSpeed: done)
        self.scale = self._current_scale()
        overflow = bool(self.zero_optimizer.overflow) if self.zero_optimizer is not None else self.scale < before
        if self.grad_scaler is not None and self.scale < self.min_loss_scale:
            self.grad_scaler.update(self.min_loss_scale)  # GradScaler has no floor of its own
            self.scale = self.min_loss_scale
        self.overflows += overflow
        at_floor = overflow and before <= self.min_loss_scale
        self._count(~loss_is_finite | at_floor, ~loss_is_finite | overflow, loss_is_finite)
        return not overflow

    def _count(self, bad: torch.Tensor, skipped: torch.Tensor, loss_is_finite: torch.Tensor) -> None:
        self.in_a_row = (self.in_a_row + 1) * bad
        self.most_in_a_row = torch.maximum(self.most_in_a_row, self.in_a_row)
        self.skipped, self.loss_is_finite = skipped, loss_is_finite

    def read(self) -> dict:
        """On a step the loop logs or saves: {"bad_in_a_row": the longest run of bad steps since the
        last read, "healthy": whether the last step was good, "skipped": whether it was skipped,
        "loss_is_finite": whether its loss was}. The same on every rank: it is computed from values
        that are."""
        most, last, skipped, finite = torch.stack(
            [self.most_in_a_row, self.in_a_row, self.skipped.long(), self.loss_is_finite.long()]).tolist()
        self.most_in_a_row = self.in_a_row.clone()
        return {"bad_in_a_row": most, "healthy": last == 0, "skipped": bool(skipped), "loss_is_finite": bool(finite)}

    def scale_record(self) -> dict:
        """For a logged step, when scaling: the loss scale now and the steps the scaler skipped since
        the last record."""
        if not self.scales:
            return {}
        record = {"loss_scale": self.scale, "overflow": self.overflows}
        self.overflows = 0
        return record


def whole(value) -> torch.Tensor | None:
    """A plain tensor: FSDP2 may hand the loss back as a replicated DTensor, DeepSpeed its gradient
    norm as a float (a 0-dim CPU tensor then combines with tensors on any device)."""
    if isinstance(value, float):
        return torch.tensor(value)
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def model_fp16(accelerator) -> bool:
    return accelerator.state.deepspeed_plugin.deepspeed_config.get("fp16", {}).get("enabled") is True
