"""DDP: its constructor arguments from the run config, and how its gradients travel (comm hooks)."""

from __future__ import annotations

from dataclasses import fields, replace

import torch
from accelerate.utils import DistributedDataParallelKwargs

from ..config import DdpConfig, RunConfig, UserError

# DDP's gradients live in its all-reduce buckets instead of being copied into them after backward:
# one model-sized copy less per step and one gradient-sized buffer less in memory.
DDP_KWARGS = DistributedDataParallelKwargs(gradient_as_bucket_view=True)


def ddp_kwargs(cfg: RunConfig, kind: str) -> DistributedDataParallelKwargs:
    """DDP_KWARGS with the run's DDP bucket size and static graph (its comm hook: register_comm_hook).
    A `ddp.*` key set under another strategy (`kind`, as Requested names it) would silently do
    nothing, so it is refused."""
    default = DdpConfig()
    changed = [f.name for f in fields(default) if getattr(cfg.ddp, f.name) != getattr(default, f.name)]
    if changed and kind != "ddp":
        running = {"fsdp": "FSDP", "deepspeed": "DeepSpeed", "single": "a single process"}.get(kind, kind)
        raise UserError(f"ddp.{changed[0]} applies to DDP only; this launch runs {running}: remove it or use "
                        "accelerate_configs/ddp.yaml")
    return replace(DDP_KWARGS, bucket_cap_mb=cfg.ddp.bucket_cap_mb, static_graph=cfg.ddp.static_graph)


def register_comm_hook(model, cfg: RunConfig) -> None:
    """After `prepare`, under DDP: how gradients travel (ddp.comm_hook), before the first backward.

    Registered here, not through accelerate's DistributedDataParallelKwargs.comm_hook, which hands
    torch's hooks to DDP as they are: DDP refuses torch's bf16 hook without NCCL (gloo all-reduces
    bf16 all the same), and PowerSGD chains its all-reduces in callbacks that gloo runs on its own
    threads, so with several buckets in flight the ranks can issue them in different orders (gloo
    stops with "Received data size doesn't match"); on gloo each bucket finishes before the next."""
    if cfg.ddp.comm_hook == "none" or not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if cfg.ddp.comm_hook == "fp16":
        model.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif cfg.ddp.comm_hook == "bf16":
        model.register_comm_hook(None, _bf16_all_reduce)
    else:
        state = powerSGD_hook.PowerSGDState(None, matrix_approximation_rank=cfg.ddp.powersgd_rank,
                                            start_powerSGD_iter=cfg.ddp.powersgd_start_step)
        hook = powerSGD_hook.powerSGD_hook
        model.register_comm_hook(state, _one_bucket_at_a_time(hook) if torch.distributed.get_backend() == "gloo"
                                 else hook)


def _bf16_all_reduce(process_group, bucket):
    """torch's bf16_compress_hook under another name (DDP checks the name): the bucket's gradients,
    divided by the world size, all-reduced in bf16 and written back in their own dtype."""
    group = process_group or torch.distributed.group.WORLD
    buffer = bucket.buffer()
    compressed = buffer.to(torch.bfloat16).div_(group.size())

    def decompress(future):
        return buffer.copy_(future.value()[0])

    return torch.distributed.all_reduce(compressed, group=group, async_op=True).get_future().then(decompress)


def _one_bucket_at_a_time(hook):
    def finish_before_next_bucket(state, bucket):
        future = hook(state, bucket)
        future.wait()
        return future

    return finish_before_next_bucket


def grad_reduce_dtype(model, cfg: RunConfig) -> torch.dtype:
    """Under autocast the gradients are the fp32 parameters'; a compression hook sends them in 16 bits."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.ddp.comm_hook) or next(model.parameters()).dtype
