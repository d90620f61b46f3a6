"""Optimizer and LR schedule. Parameters are grouped so biases and LayerNorm weights get no decay."""

from __future__ import annotations

import torch
from transformers import get_scheduler

from .config import OptimConfig, UserError


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:  # frozen base weights under LoRA never reach the optimizer
            continue
        (no_decay if param.ndim < 2 or "layer_norm" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, **kwargs)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserError(f"optim.name={cfg.name} needs bitsandbytes: pip install bitsandbytes") from None
    if cfg.name == "adamw_8bit":
        return bnb.optim.AdamW8bit(groups, **kwargs)
    if cfg.name == "paged_adamw_8bit":
        return bnb.optim.PagedAdamW8bit(groups, **kwargs)
    raise UserError(f"optim.name={cfg.name} is not a torch or bitsandbytes optimizer")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
    """Stepped once per optimizer step (never per micro-batch or per process)."""
    name = "constant_with_warmup" if cfg.scheduler == "constant" else cfg.scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=max_steps)
