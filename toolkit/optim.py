"""Optimizer and LR schedule. Parameters are grouped so biases and LayerNorm weights get no decay.

Which optimizer can run under which strategy is decided before any work, in
`strategy.check_optimizer`; the builders here only build.
"""

from __future__ import annotations

import functools

import torch

from .config import OptimConfig, UserError

EIGHT_BIT = ("adamw_8bit", "paged_adamw_8bit")


def import_bitsandbytes(name: str):
    try:
        import bitsandbytes
    except ImportError:
        raise UserError(f"optim.name={name} needs bitsandbytes: pip install bitsandbytes") from None
    return bitsandbytes


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:  # frozen base weights under LoRA never reach the optimizer
            continue
        (no_decay if param.ndim < 2 or "layer_norm" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # No empty groups (LoRA trains matrices only): DeepSpeed drops them and the LR scheduler,
    # built over the groups we made, would then no longer match the optimizer.
    return [group for group in groups if group["params"]]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig):
    """A torch or bitsandbytes optimizer; for `deepspeed`, a placeholder carrying the parameter
    groups, from which DeepSpeed builds the optimizer its JSON defines during `prepare`."""
    groups = param_groups(model, cfg.weight_decay)
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if cfg.name == "deepspeed":
        from accelerate.utils import DummyOptim
        return DummyOptim(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        # One fused kernel over all parameters (the default on CPU is a loop of ops per tensor).
        return torch.optim.AdamW(groups, **kwargs, fused=True)
    bnb = import_bitsandbytes(cfg.name)
    if cfg.name == "adamw_8bit":
        return bnb.optim.AdamW8bit(groups, **kwargs)
    if cfg.name == "paged_adamw_8bit":
        return bnb.optim.PagedAdamW8bit(groups, **kwargs)
    raise UserError(f"optim.name={cfg.name} is not a torch or bitsandbytes optimizer")


def build_scheduler(optimizer, cfg: OptimConfig, max_steps: int, json_scheduler: bool = False):
    """Stepped once per optimizer step (never per micro-batch or per process).

    With a DeepSpeed-owned optimizer (`optim.name=deepspeed`) the optimizer does not exist yet, so
    DeepSpeed gets a recipe: the run config's schedule, built on its optimizer, or, when the
    DeepSpeed JSON defines a "scheduler" section (`json_scheduler`), that one."""
    from transformers import get_scheduler  # here, not at import: it loads peft and bitsandbytes (seconds)

    name = "constant_with_warmup" if cfg.scheduler == "constant" else cfg.scheduler
    schedule = functools.partial(get_scheduler, name, num_warmup_steps=cfg.warmup_steps,
                                 num_training_steps=max_steps)
    if cfg.name == "deepspeed":
        from accelerate.utils import DummyScheduler
        if json_scheduler:
            return DummyScheduler(optimizer, total_num_steps=max_steps, warmup_num_steps=cfg.warmup_steps)
        return DummyScheduler(optimizer, lr_scheduler_callable=schedule)
    return schedule(optimizer)
