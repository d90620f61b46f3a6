"""DeepSpeed ZeRO: the JSON's "auto" fields from the run config, which optimizers it runs as
asked, its fp32 master weights, and what `verify` checks of the engine."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..config import RunConfig, UserError
from ..optim import EIGHT_BIT

MIN_AIO_BYTES = 2**20  # deepspeed.runtime.swap_tensor.utils.MIN_AIO_BYTES
# Keys of a DeepSpeed JSON that the run config owns; "auto" (or absent) in the JSON takes the run's value.
RUN_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                      "gradient_clipping")
# optim.* keys a DeepSpeed "optimizer" section may leave "auto" (accelerate fills only lr and weight_decay).
OPTIM_KEYS = {"lr": "lr", "weight_decay": "weight_decay", "betas": ("beta1", "beta2"), "eps": "eps"}


def fill_config(plugin, cfg: RunConfig, num_processes: int) -> None:
    """One run config drives every strategy: batch, accumulation and clipping come from it.

    accelerate would fill "auto" clipping with 1.0 whatever the run says, and quietly prefer a
    DeepSpeed JSON's accumulation steps over the run's; a JSON that disagrees is an error here."""
    ds = plugin.deepspeed_config
    run = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum_steps,
        "train_batch_size": cfg.train.global_batch_size(num_processes),
        "gradient_clipping": cfg.optim.max_grad_norm,
    }
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    written = json.loads(Path(path).read_text()) if path != "none" else {}  # as the user wrote it
    for key in RUN_KEYS:
        value = written.get(key, "auto")
        if value != "auto" and value != run[key]:
            raise UserError(f"{path} sets {key}={value} but the run config implies {run[key]}: "
                            f'set "{key}": "auto" there so the run config decides')
        ds[key] = run[key]
    if "fp16" in ds:  # the loss scale's floor, below which an overflow is a bad step (guard.py)
        floor = (written.get("fp16") or {}).get("min_loss_scale", "auto")
        if floor != "auto" and float(floor) != cfg.train.min_loss_scale:
            raise UserError(f"{path} sets fp16.min_loss_scale={floor} but the run config has "
                            f'train.min_loss_scale={cfg.train.min_loss_scale:g}: set "min_loss_scale": "auto" there '
                            "so the run config decides")
        ds["fp16"]["min_loss_scale"] = cfg.train.min_loss_scale
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:
        # ZeRO-3 keeps gathered parameters for later use and prefetch up to these counts (DeepSpeed's
        # default 1e9 is the whole of a model below 1B: a rank would hold its shard plus nearly
        # the whole model). "auto": two decoder layers, the one at work and the next one fetched.
        from ..model import layer_numel, shape
        from ..shapes import largest_parameter_numel

        for key in ("stage3_max_live_parameters", "stage3_max_reuse_distance"):
            if zero.get(key) == "auto":
                zero[key] = 2 * layer_numel(cfg.model)
        param = zero.get("offload_param") or {}
        if param.get("device") == "nvme" and param.get("buffer_size", "auto") == "auto":
            # Each pinned swap buffer holds a whole parameter: DeepSpeed's fixed 1e8 elements fail in
            # zero.Init ("More elements ... than buffer size") from opt-2.7b's embeddings (128.7M) up.
            param["buffer_size"] = max(10**8, largest_parameter_numel(shape(cfg.model)))
    for offload in ("offload_param", "offload_optimizer"):
        section = zero.get(offload) or {}
        if section.get("device") == "nvme" and section.get("nvme_path") in (None, "auto", "none"):
            # Swap files belong to the run; DeepSpeed needs the folder to exist.
            section["nvme_path"] = str((Path(cfg.output_dir) / "nvme_offload").resolve())
            Path(section["nvme_path"]).mkdir(parents=True, exist_ok=True)


def check_nvme_space(plugin, cfg: RunConfig, mixed_precision: str, world_size: int, local_processes: int) -> None:
    """Before any work: NVMe offload's swap files must fit their disk, and with checkpoints on, one
    checkpoint's copy of the optimizer's beside them; otherwise the run fails in its first step or
    at its first checkpoint (random-opt-2.7b in bf16: 48 GB of swap files, 32 GB per checkpoint).
    Sized as toolkit.plan sizes them, per process of this node: the 16- or 32-bit weights, and per
    trained parameter the fp32 master, Adam's two moments and the fp32 gradient swapped out with
    them (16 bytes), of which a checkpoint copies all but the gradient (12)."""
    import shutil

    from ..model import shape
    from ..plan import count_params, lora_params

    zero = plugin.deepspeed_config.get("zero_optimization", {})
    paths = {key: Path(section["nvme_path"]) for key in ("offload_param", "offload_optimizer")
             for section in [zero.get(key) or {}] if section.get("device") == "nvme"}
    if not paths:
        return
    model = shape(cfg.model)
    n = count_params(model)[0]
    t = lora_params(model, cfg.lora.r, list(cfg.lora.target_modules)) if cfg.lora.enabled else n
    on_node = local_processes / world_size
    swap = {"offload_param": (2 if mixed_precision in ("bf16", "fp16") else 4) * n * on_node,
            "offload_optimizer": 16 * t * on_node}

    def disk(path: Path) -> tuple[int, list]:  # (its device, [path, bytes to hold there, bytes free])
        existing = next(p for p in (path, *path.parents) if p.exists())  # the directory may not exist yet
        return existing.stat().st_dev, [path, 0, shutil.disk_usage(existing).free]

    needs = {}
    for key, path in paths.items():
        device, entry = disk(path)
        needs.setdefault(device, entry)[1] += swap[key]
    for path in set(paths.values()):  # swap files an earlier run of this output_dir left are overwritten
        needs[disk(path)[0]][2] += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    for path, need, free in needs.values():
        if need > free:
            raise UserError(f"NVMe offload needs {need / 1e9:.1f} GB of swap files on this node in {path}, which has "
                            f"{free / 1e9:.1f} GB free: free space, point nvme_path in the DeepSpeed JSON to a larger "
                            "disk, or run fewer processes per node")
    output = Path(cfg.output_dir)
    if cfg.checkpoint.every and "offload_optimizer" in paths:
        checkpoint = 12 * t * on_node
        device, entry = disk(output)
        _, need, free = needs.get(device, entry)
        if need + checkpoint > free:
            raise UserError(f"NVMe offload's swap files ({need / 1e9:.1f} GB) and one checkpoint's copy of the optimizer "
                            f"state ({checkpoint / 1e9:.1f} GB) need {(need + checkpoint) / 1e9:.1f} GB on the disk of "
                            f"{output}, which has {free / 1e9:.1f} GB free: checkpoints would fail; free space, put "
                            "nvme_path or output_dir on another disk, or set checkpoint.every=0")


def check_fp16(plugin) -> None:
    from deepspeed.accelerator import get_accelerator

    if plugin.deepspeed_config.get("fp16", {}).get("enabled") is True and not get_accelerator().is_fp16_supported():
        raise UserError(f"DeepSpeed's {get_accelerator().device_name()} accelerator has no fp16: launch with "
                        "--mixed_precision bf16 (or no), or use fsdp/ddp for fp16 here")


def check_optimizer(accelerator, cfg: RunConfig) -> None:
    """An optimizer DeepSpeed would not run as asked (see strategy.check_optimizer). For
    `optim.name=deepspeed`, the JSON's "auto" optimizer parameters take the run config's values."""
    name = cfg.optim.name
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    source = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    source = "the DeepSpeed config" if source == "none" else source
    offload = (ds.get("zero_optimization", {}).get("offload_optimizer") or {}).get("device") or "none"
    if name != "deepspeed":
        for section in ("optimizer", "scheduler"):
            if section in ds:  # accelerate's own error here names neither the cause nor optim.name
                raise UserError(f'{source} has its own "{section}" section, which DeepSpeed only runs with its own '
                                f"optimizer, not the run's optim.name={name}: set optim.name=deepspeed to use it, or "
                                f'remove "{section}" from the JSON')
        if name in EIGHT_BIT and offload != "none":
            raise UserError(f"optim.name={name} cannot run with DeepSpeed optimizer offload ({offload}): DeepSpeed "
                            "steps an offloaded optimizer itself and accelerate would swap in DeepSpeedCPUAdam: use "
                            "optim.name=adamw with this config (it runs DeepSpeedCPUAdam), or a config without "
                            "offload (accelerate_configs/zero2.yaml) for 8-bit states")
        return
    if "optimizer" not in ds:
        raise UserError(f'optim.name=deepspeed needs an "optimizer" section in {source}, which has none: add one, '
                        'e.g. "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}, or use optim.name=adamw')
    params = ds["optimizer"].setdefault("params", {})
    for key, ours in OPTIM_KEYS.items():
        run = [getattr(cfg.optim, k) for k in ours] if isinstance(ours, tuple) else getattr(cfg.optim, ours)
        value = params.get(key, "auto")
        if value == "auto":
            params[key] = run
        elif (list(value) if isinstance(value, (list, tuple)) else value) != run:
            keys = "/".join(f"optim.{k}" for k in ours) if isinstance(ours, tuple) else f"optim.{ours}"
            raise UserError(f'{source} sets optimizer.params.{key}={value} but the run config has {keys}={run}: '
                            f'set "{key}": "auto" there so the run config decides')


def full_parameter(param) -> torch.Tensor:
    """All ranks: one whole parameter (an all-gather under ZeRO-3). Under bf16/fp16 the engine's
    parameters are 16-bit working copies: a trained one's fp32 master sits in ZeRO's flat optimizer
    partitions (`safe_get_full_fp32_param`); a frozen one has none."""
    from deepspeed import zero
    from deepspeed.utils import safe_get_full_fp32_param

    if param.requires_grad and param.dtype != torch.float32:
        return safe_get_full_fp32_param(param)
    if hasattr(param, "ds_id"):  # a ZeRO-3 partition
        with zero.GatheredParameters([param]):
            return param.data.clone()
    return param.detach()


def restore_swapped_optimizer_state(engine, saved: Path, rank: int) -> None:
    """All ranks, after `load_state` of a checkpoint saved with NVMe optimizer offload (`saved`: its
    pytorch_model/ folder).

    DeepSpeed 0.19 copies the checkpoint's swap files (fp32 partition, exp_avg, exp_avg_sq) back into
    its swap folder but skips the optimizer's state dict there: each swapped sub-group's Adam state is
    empty, so the next step restarts the moments from zero at step 1 (and overwrites the copied files).
    Here each sub-group gets its saved step count, and its moments are registered with the swapper
    under the names of the copied files, so the next swap-in reads them. Sub-groups too small to swap
    get their in-memory state and fp32 partition back from the checkpoint."""
    zero3 = engine.optimizer
    (path,) = saved.glob(f"*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    # DeepSpeed's own pickle of this run's optimizer; its loader reads it the same way
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
    states = checkpoint["optimizer_state_dict"]["state"]
    # torch numbers states in param-group order, where DeepSpeed put each sub-group's fp32 partition
    in_saved_order = sorted(range(len(zero3.fp32_partitioned_groups_flat)), key=lambda i: zero3.sub_group_to_group_id[i])
    zero3.optimizer_swapper.purge_state()  # forget the (empty) states it knew
    for index, sub_group in enumerate(in_saved_order):
        fp32 = zero3.fp32_partitioned_groups_flat[sub_group]
        state = zero3.optimizer.state[fp32]
        if not zero3._swappable_optimizer_subgroup(sub_group):
            fp32.data.copy_(checkpoint["fp32_flat_groups"][sub_group])
            state.update(states[index])
            # and the model's weights from it, as the optimizer does after a step: they still held
            # the new run's initial values (the resume test, with a sub-group of each kind)
            zero3._reassign_or_swap_out_partitioned_parameters(sub_group)
            continue
        numel = zero3.fp16_partitioned_groups_flat_numel[sub_group]
        for key, value in states[index].items():
            # a moment is a stand-in of the partition's size that holds no memory: the swap-in gives it its buffer
            state[key] = torch.empty(1, dtype=fp32.dtype).expand(numel) if torch.is_tensor(value) else value
        zero3.optimizer_swapper._get_param_swap_info(fp32)  # registers them: exp_avg-<id>.tensor.swp, the copied files
    # Small parameters are kept whole on every rank ("persistent"): DeepSpeed gathered them at the end
    # of its load, from partitions the lines above have changed since; they are gathered again.
    persistent = zero3.persistent_parameters
    if persistent:
        persistent[0].partition(persistent)
        persistent[0].all_gather(persistent)


def json_scheduler(plugin) -> bool:
    """Whether a DeepSpeed JSON defines the LR schedule (a "scheduler" section; optim.name=deepspeed only)."""
    return "scheduler" in plugin.deepspeed_config


def verify(accelerator, model, requested, fail, local: int, full: int) -> dict:
    """After `prepare`: a DeepSpeed engine runs the ZeRO stage asked for, sharded where it should be
    (`local` of `full` elements on this rank); what runs."""
    import deepspeed
    from accelerate.utils import DistributedType

    running = accelerator.distributed_type
    if running != DistributedType.DEEPSPEED or not isinstance(model, deepspeed.DeepSpeedEngine):
        fail(f"accelerate runs {running.value} without a DeepSpeed engine")
    stage = model.zero_optimization_stage()
    wanted_stage = accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"].get("stage", 0)
    if stage != wanted_stage:
        fail(f"DeepSpeed runs ZeRO stage {stage}, not {wanted_stage}")
    if stage == 3 and requested.world_size > 1 and local >= full:
        fail(f"ZeRO-3 left the parameters unsharded ({local} of {full} elements on this rank)")
    if _offload_device(model.zero_offload_optimizer()) == "nvme" and local * 4 < MIN_AIO_BYTES:
        # DeepSpeed keeps optimizer sub-groups under 1 MiB per rank in memory: nothing would be
        # swapped, and "NVMe offload" would quietly be CPU offload.
        raise UserError(f"NVMe optimizer offload needs at least {MIN_AIO_BYTES} bytes of fp32 state per rank; "
                        f"this model has {local * 4}: use accelerate_configs/zero3_offload.yaml for a model this small")
    info = {}
    if stage == 3 and _offload_device(model.zero_offload_optimizer()) == "none":
        info["zero3_fp32_masters"] = "the parameters" if masters_are_parameters(model.optimizer) else "a copy"
    info.update(zero_stage=stage, grad_reduce_dtype=str(model.communication_data_type).removeprefix("torch."),
                offload_optimizer=_offload_device(model.zero_offload_optimizer()),
                offload_param=_offload_device(model.zero_offload_param()),
                mixed_precision="bf16" if model.bfloat16_enabled() else "fp16" if model.fp16_enabled() else "no")
    return info


def masters_are_parameters(zero3_optimizer) -> bool:
    """Whether ZeRO-3 updates the fp32 parameter partitions in place (see share_zero3_fp32_partitions)."""
    return all(master.data_ptr() == param.data_ptr() for master, param in
               zip(zero3_optimizer.fp32_partitioned_groups_flat, zero3_optimizer.fp16_partitioned_groups_flat))


def _offload_device(offload_config) -> str:
    device = getattr(offload_config, "device", None)
    return str(getattr(device, "value", device) or "none")
