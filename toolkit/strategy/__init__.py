"""The strategy `accelerate launch` asked for, made to run and checked: the entry points the run
calls, whatever the engine. The engines' own parts live beside this module: ddp.py, fsdp.py and
zero.py (DeepSpeed); the library internals they patch, in toolkit/patches.py.

`accelerate launch --config_file X.yaml` tells each process, through environment variables, which
strategy was asked for. `make_accelerator` builds an Accelerator that really runs it, also on a
machine without a GPU, where accelerate alone silently falls back (docs/strategies.md);
`verify` checks after `prepare` that what runs is what was asked, and records it.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
from accelerate import Accelerator, DataLoaderConfiguration, PartialState
from accelerate.utils import DistributedType, GradientAccumulationPlugin, InitProcessGroupKwargs

from .. import job, measure, patches, telemetry
from ..config import RunConfig, UserError
from ..launch import Requested
from ..optim import EIGHT_BIT, import_bitsandbytes
from . import ddp, fsdp, zero


def make_accelerator(cfg: RunConfig) -> Accelerator:
    requested = Requested.from_env()
    requested.refuse_model_parallelism()
    requested.refuse_a_smaller_world()
    ddp_kwargs = ddp.ddp_kwargs(cfg, requested.kind)  # refuses ddp.* keys where DDP does not run, before any group
    on_cpu = not torch.cuda.is_available()
    # A dead or stalled rank ends every collective after this long, instead of torch's 30 minutes.
    timeout = timedelta(seconds=cfg.train.collective_timeout)
    job.wait_for_peers_at_most(timeout)  # the job's own votes among ranks, too
    common = dict(
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.train.grad_accum_steps, sync_with_dataloader=False),  # the loop owns step windows
        # Seeded per-epoch shuffling that is identical on every rank and after a resume.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        step_scheduler_with_optimizer=False,  # the loop steps the scheduler once per optimizer step
        log_with=telemetry.trackers(cfg.train.report_to, cfg.output_dir),  # started by Telemetry
        project_dir=cfg.output_dir,
    )
    if requested.kind == "deepspeed":
        # DeepSpeed picks its CPU accelerator by itself; it only needs a backend that exists here.
        handlers = [InitProcessGroupKwargs(backend="gloo" if on_cpu else None, timeout=timeout)]
        accelerator = Accelerator(kwargs_handlers=handlers, **common)
        plugin = accelerator.state.deepspeed_plugin
        zero.fill_config(plugin, cfg, accelerator.num_processes)
        # accelerate handed transformers (whose zero.Init partitions the model as it is built) a copy of
        # the JSON when the Accelerator was made, "auto" still unfilled: without the filled one, ZeRO-3's
        # NVMe parameter swap files went to ./none (accelerate's placeholder) instead of output_dir.
        plugin.set_deepspeed_weakref()
        patches.share_zero3_fp32_partitions()
        zero.check_fp16(plugin)
        zero.check_nvme_space(plugin, cfg, accelerator.mixed_precision, accelerator.num_processes,
                              int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)))
    elif on_cpu and requested.world_size > 1:
        # Without CUDA, a MULTI_GPU/FSDP config makes each process believe it is alone. Start the
        # gloo process group as MULTI_CPU first (and, for FSDP, make accelerate see FSDP).
        PartialState(cpu=True, timeout=timeout)
        if requested.kind == "fsdp":
            patches.run_fsdp_on_cpu()
        accelerator = Accelerator(cpu=True, kwargs_handlers=[ddp_kwargs], **common)
    else:
        accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout), ddp_kwargs], **common)

    if accelerator.distributed_type == DistributedType.FSDP:
        fsdp.adapt(accelerator.state.fsdp_plugin, on_cpu)
    patches.enable_cpu_fp16(accelerator)
    return accelerator


def shards_parameters(accelerator) -> bool:
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    return (accelerator.distributed_type == DistributedType.DEEPSPEED
            and accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage") == 3)


def register_comm_hook(model, cfg: RunConfig) -> None:
    """After `prepare`: how DDP's gradients travel (ddp.comm_hook); nothing under other strategies."""
    ddp.register_comm_hook(model, cfg)


def check_optimizer(accelerator: Accelerator, cfg: RunConfig) -> None:
    """Right after `make_accelerator`, before any work: refuse an optimizer the strategy cannot run
    (or would silently replace), with what to use instead."""
    name = cfg.optim.name
    if name in EIGHT_BIT:
        import_bitsandbytes(name)
    running = accelerator.distributed_type
    if running == DistributedType.DEEPSPEED:
        zero.check_optimizer(accelerator, cfg)
    elif name == "deepspeed":
        raise UserError(f"optim.name=deepspeed is the optimizer a DeepSpeed JSON defines, but this launch runs "
                        f"{running.value}, not DeepSpeed: launch with a DeepSpeed accelerate config whose JSON has "
                        'an "optimizer" section, or use optim.name=adamw')
    elif name in EIGHT_BIT and running == DistributedType.FSDP:
        raise UserError(f"optim.name={name} cannot update FSDP2's sharded parameters (bitsandbytes fails with "
                        "'got mixed torch.Tensor and DTensor'): use optim.name=adamw with FSDP, or a DeepSpeed "
                        "config without optimizer offload (accelerate_configs/zero2.yaml) for 8-bit states")


def check_lora(accelerator: Accelerator, cfg: RunConfig) -> None:
    """Before any work: QLoRA's 4-bit base runs where each process holds the whole model."""
    running = accelerator.distributed_type
    if cfg.lora.quantize != "none" and running in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise UserError(f"lora.quantize={cfg.lora.quantize} runs on one process or under DDP "
                        f"(accelerate_configs/single.yaml, ddp.yaml): {running.value} shards or casts the base, "
                        "which bitsandbytes' packed 4-bit weights can't go through; set lora.quantize=none here")


def autocast_dtype(accelerator: Accelerator) -> torch.dtype | None:
    """The dtype accelerate's autocast computes in (DDP, FSDP, one process), None in fp32 and under
    DeepSpeed, whose bf16/fp16 modes cast the module themselves."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)


def checkpoint_layout(accelerator: Accelerator) -> str:
    """The layout `save_state` writes under this strategy (see checkpoint.layout)."""
    return {DistributedType.DEEPSPEED: "deepspeed", DistributedType.FSDP: "fsdp"}.get(accelerator.distributed_type,
                                                                                      "full")


def full_weights(accelerator: Accelerator, model, names=None):
    """All ranks, in step: the trained weights one parameter at a time, as the optimizer holds them
    (fp32 masters), whole on the main process (None on the others), named as the unwrapped model
    names them; only `names` if given. A shared (tied) parameter comes once, under its first name.

    A generator every rank must drive to the end: each parameter is one collective under ZeRO-3 and
    FSDP, so no rank ever holds more of the model than one parameter beyond its shards (accelerate's
    `get_state_dict` gathers the whole model on rank 0 first: 264 GB of fp32 at opt-66b)."""
    from torch.distributed.tensor import DTensor

    unwrapped = accelerator.unwrap_model(model)
    running = accelerator.distributed_type
    if running == DistributedType.DEEPSPEED:
        # ZeRO-3 leaves prefetched parameters in flight and small ones gathered after a step: settle
        # them all (partitioned, as gathering one at a time expects); nothing to do below stage 3.
        model.empty_partition_cache()
    for name, param in unwrapped.named_parameters():
        if names is not None and name not in names:
            continue
        if running == DistributedType.DEEPSPEED:
            full = zero.full_parameter(param)
        elif isinstance(param, DTensor):  # FSDP2's shard
            full = param.full_tensor()
        else:
            full = param.detach()
        yield name, full.cpu() if accelerator.is_main_process else None


def shard_before_optimizer(accelerator: Accelerator, model):
    """FSDP: shard the model now, so the optimizer is built on the shards (fsdp.py); others: as is."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return model
    return fsdp.shard_before_optimizer(accelerator, model)


def init_device(accelerator: Accelerator) -> torch.device:
    """Where a preset's parameters are materialised: the device, or the CPU under FSDP offload."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return fsdp.init_device(accelerator.state.fsdp_plugin) or accelerator.device
    return accelerator.device


def json_scheduler(accelerator: Accelerator) -> bool:
    """Whether a DeepSpeed JSON defines the LR schedule (a "scheduler" section; optim.name=deepspeed only)."""
    return (accelerator.distributed_type == DistributedType.DEEPSPEED
            and zero.json_scheduler(accelerator.state.deepspeed_plugin))


def enable_activation_checkpointing(accelerator: Accelerator, model) -> str:
    """Recompute each decoder layer's activations in backward; returns the mechanism used.

    Under FSDP, accelerate wraps every OPTDecoderLayer in torch's checkpoint wrapper before
    sharding it (call before `prepare`), so recomputation happens inside the layer's all-gather;
    elsewhere transformers' own (non-reentrant, which also works with frozen LoRA base weights)."""
    if accelerator.distributed_type == DistributedType.FSDP:
        accelerator.state.fsdp_plugin.activation_checkpointing = True
        return "fsdp"
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return "transformers"


def verify(accelerator: Accelerator, model, optimizer, cfg: RunConfig) -> dict:
    """After `prepare`: stop unless the requested strategy is the one running; return what runs."""
    requested = Requested.from_env()
    running = accelerator.distributed_type

    def fail(what: str):
        raise UserError(f"asked for {requested.kind} on {requested.world_size} processes but {what}; "
                        "the run would silently train something else, so it stops (check the accelerate config "
                        "and that every process was started)")

    if accelerator.num_processes != requested.world_size:
        fail(f"{accelerator.num_processes} process(es) joined")
    local, full = measure.sharded_numel(model)
    info: dict = {"num_processes": accelerator.num_processes, "distributed_type": str(running.value),
                  "device": accelerator.device.type, "params_local_numel": local, "params_numel": full}
    if requested.kind == "deepspeed":
        info.update(zero.verify(accelerator, model, requested, fail, local, full))
    elif requested.kind == "fsdp":
        info.update(fsdp.verify(accelerator, model, requested, fail, local, full))
    elif requested.kind == "ddp":
        if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
            fail(f"accelerate runs {running.value} without DistributedDataParallel")
        info["grad_reduce_dtype"] = str(ddp.grad_reduce_dtype(model, cfg)).removeprefix("torch.")
    else:
        info["grad_reduce_dtype"] = "none"  # one process: nothing is reduced
    if "mixed_precision" not in info:
        info["mixed_precision"] = accelerator.mixed_precision
        if accelerator.mixed_precision != "no" and not accelerator.native_amp:
            fail(f"{accelerator.mixed_precision} autocast is off")
    info.update(micro_batch_size=cfg.train.micro_batch_size, grad_accum_steps=cfg.train.grad_accum_steps,
                global_batch_size=cfg.train.global_batch_size(accelerator.num_processes),
                optimizer=type(measure.innermost(optimizer)).__name__, versions=measure.versions())
    return info
