"""FSDP2: mixed precision as DDP has it, sharding before the optimizer is built, where a preset's
shards are born, and what `verify` checks of the mesh the parameters live on."""

from __future__ import annotations

from dataclasses import replace

import torch

from ..config import UserError


def adapt(plugin, on_cpu: bool) -> None:
    """Right after the Accelerator is made: fp32 gradient reduction (`reduce_gradients_in_fp32`);
    on CPU, offload without pinned memory (which needs a GPU)."""
    from torch.distributed.fsdp import CPUOffloadPolicy

    reduce_gradients_in_fp32(plugin)
    if on_cpu and isinstance(plugin.cpu_offload, CPUOffloadPolicy):
        plugin.cpu_offload = CPUOffloadPolicy(pin_memory=False)


def reduce_gradients_in_fp32(plugin) -> None:
    """FSDP2 under bf16/fp16: reduce-scatter gradients, and accumulate them over micro-batches, in
    fp32, as DDP does (under autocast its gradients are the fp32 parameters') and as torchtitan does
    by default; and leave the model's outputs in the dtype they are computed in, so the loss (fp32
    from the fused head) is not rounded to 16 bits before backward and logging. accelerate builds the
    MixedPrecisionPolicy with reduce_dtype and output_dtype equal to the 16-bit parameter dtype: it
    sums gradients over ranks and micro-batches with 8 bits of mantissa (bf16), and the loss of
    tiny-opt came out as 7.65625."""
    policy = plugin.mixed_precision_policy
    if policy is not None and policy.param_dtype in (torch.bfloat16, torch.float16):
        plugin.mixed_precision_policy = replace(policy, reduce_dtype=torch.float32, output_dtype=None)


def shard_before_optimizer(accelerator, model):
    """Shard the model now, so the optimizer is built on the shards.

    accelerate shards inside `prepare` and then re-points the optimizer from each old parameter
    to its shard by data pointer; a model born on the meta device (a preset), or left there on the
    other ranks by a memory-efficient checkpoint load, has every pointer 0. Sharded here with
    accelerate's own function, the model arrives in `prepare` already an FSDP module, which
    `prepare` keeps as it is."""
    from accelerate.utils.fsdp_utils import fsdp2_apply_ac, fsdp2_prepare_model

    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version != 2:
        raise UserError("this toolkit runs FSDP2: set fsdp_version: 2 in the accelerate config "
                        "(see accelerate_configs/fsdp.yaml)")
    if all(p.is_meta for p in model.parameters()):
        # A preset: every rank initialises its own shards afterwards; rank 0 has nothing to broadcast.
        plugin.cpu_ram_efficient_loading = False
    plugin.set_auto_wrap_policy(model)
    if plugin.activation_checkpointing:  # wraps the layers, which must happen before sharding
        model = fsdp2_apply_ac(accelerator, model)
        plugin.activation_checkpointing = False  # done: `prepare` would wrap them a second time
    return fsdp2_prepare_model(accelerator, model)


def init_device(plugin) -> torch.device:
    """Where a preset's shards are materialised: on the CPU under FSDP offload (None: the device)."""
    from torch.distributed.fsdp import CPUOffloadPolicy

    return torch.device("cpu") if isinstance(plugin.cpu_offload, CPUOffloadPolicy) else None


def verify(accelerator, model, requested, fail, local: int, full: int) -> dict:
    """After `prepare`: FSDP2 runs, the parameters are sharded (`local` of `full` elements on this
    rank) on the mesh asked for; what runs."""
    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import CPUOffloadPolicy

    if accelerator.distributed_type != DistributedType.FSDP:
        fail(f"accelerate runs {accelerator.distributed_type.value}, not FSDP")
    if requested.world_size > 1 and local >= full:
        fail(f"FSDP left the parameters unsharded ({local} of {full} elements on this rank)")
    plugin = accelerator.state.fsdp_plugin
    policy = plugin.mixed_precision_policy
    reduce_dtype = policy and (policy.reduce_dtype or policy.param_dtype) or next(model.parameters()).dtype
    return {"grad_reduce_dtype": str(reduce_dtype).removeprefix("torch."), "fsdp_version": plugin.fsdp_version,
            "reshard_after_forward": bool(plugin.reshard_after_forward),
            "offload_param": isinstance(plugin.cpu_offload, CPUOffloadPolicy),
            **check_mesh(accelerator, model, requested.mesh, fail)}


def check_mesh(accelerator, model, asked: dict[str, int], fail) -> dict:
    """FSDP2: the mesh the parameters really live on, checked against the one asked for.

    Plain FSDP shards every parameter over all ranks (one mesh dimension, Shard(0)); HSDP
    (dp_replicate x dp_shard) keeps one copy per replica group and shards it within the group, so
    every parameter is a DTensor on the 2-D mesh with placements (Replicate(), Shard(0))."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    replicate, shard = asked.get("dp_replicate", 1), asked.get("dp_shard", 1)
    if asked and replicate * shard != accelerator.num_processes:
        fail(f"dp_replicate {replicate} x dp_shard {shard} is not the {accelerator.num_processes} processes")
    if not asked:
        replicate, shard = 1, accelerator.num_processes
    expected_shape, expected_placements = ((replicate, shard), (Replicate(), Shard(0))) if replicate > 1 else \
        ((shard,), (Shard(0),))
    for name, param in model.named_parameters():
        if not isinstance(param, DTensor):
            fail(f"{name} is not sharded (not a DTensor)")
        if tuple(param.device_mesh.shape) != expected_shape or tuple(param.placements) != expected_placements:
            fail(f"{name} lives on mesh {tuple(param.device_mesh.shape)} {param.device_mesh.mesh_dim_names} with "
                 f"placements {tuple(param.placements)}, not {expected_shape} {expected_placements}")
    mesh = next(model.parameters()).device_mesh
    return {"fsdp_mesh": {str(dim): size for dim, size in zip(mesh.mesh_dim_names or ("dp_shard",), mesh.shape)},
            "fsdp_placements": [str(p) for p in expected_placements],
            "fsdp_mesh_backend": torch.distributed.get_backend(mesh.get_group(len(mesh.shape) - 1))}
