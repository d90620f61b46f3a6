"""The only module that knows about distributed types.

`accelerate launch --config_file X.yaml` tells each process, through environment variables, which
strategy was asked for. `make_accelerator` builds an Accelerator that really runs it, also on a
machine without a GPU, where accelerate alone silently falls back (docs/strategies.md);
`verify` checks after `prepare` that what runs is what was asked, and records it.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration, PartialState
from accelerate.utils import (DistributedDataParallelKwargs, DistributedType, GradientAccumulationPlugin,
                               InitProcessGroupKwargs)

from . import job, telemetry
from .config import DdpConfig, RunConfig, UserError
from .optim import EIGHT_BIT, import_bitsandbytes

# DDP's gradients live in its all-reduce buckets instead of being copied into them after backward:
# one model-sized copy less per step and one gradient-sized buffer less in memory.
DDP_KWARGS = DistributedDataParallelKwargs(gradient_as_bucket_view=True)
MIN_AIO_BYTES = 2**20  # deepspeed.runtime.swap_tensor.utils.MIN_AIO_BYTES
# Keys of a DeepSpeed JSON that the run config owns; "auto" (or absent) in the JSON takes the run's value.
DEEPSPEED_RUN_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                      "gradient_clipping")


@dataclass
class Requested:
    """The strategy `accelerate launch` asked for, read from the environment it sets."""
    kind: str  # single | ddp | fsdp | deepspeed
    world_size: int
    # Sizes from a `parallelism_config` section (dp_replicate, dp_shard, tp, cp, sp); {} without one.
    mesh: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_env(cls) -> "Requested":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        mesh = {dim: int(os.environ.get(f"PARALLELISM_CONFIG_{dim.upper()}_SIZE", "1"))
                for dim in ("dp_replicate", "dp_shard", "tp", "cp", "sp")
                } if _env_flag("ACCELERATE_USE_PARALLELISM_CONFIG") else {}
        if _env_flag("ACCELERATE_USE_DEEPSPEED"):
            return cls("deepspeed", world, mesh)
        if _env_flag("ACCELERATE_USE_FSDP"):
            return cls("fsdp", world, mesh)
        return cls("ddp" if world > 1 else "single", world, mesh)

    def refuse_model_parallelism(self) -> None:
        """Only data parallelism runs (DDP, ZeRO, FSDP, HSDP's dp_replicate x dp_shard): tensor, context
        and sequence parallel sizes are refused before any process group or model exists. (A tensor-
        parallel plan for OPT trained, but accelerate's save_state fails on its DTensors: README,
        known limits.)"""
        beyond = {dim: size for dim, size in self.mesh.items()
                  if dim not in ("dp_replicate", "dp_shard") and size > 1}
        if beyond:
            sizes = ", ".join(f"{dim}_size={size}" for dim, size in beyond.items())
            raise UserError(f"the accelerate config asks for {sizes}, but this toolkit runs data parallelism only "
                            "(tensor, context and sequence parallelism are not supported): set those sizes to 1 "
                            "in its parallelism_config")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


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


def tune_cpu_allocator(accelerator: Accelerator) -> dict:
    """How glibc treats large freed blocks on CPU, chosen by what the strategy is for.

    By default glibc returns blocks above a moving threshold (up to 32 MB) to the OS, and the next
    step faults the same sizes in again page by page: the logits, the embedding's gradient, ...
    (measured at opt-125m: 0.6 s of a 7 s step). Where every rank holds the whole model (one
    process, DDP, ZeRO-1/2) the working set is the same every step, so the heap keeps it (as the
    jemalloc/tcmalloc preloads of PyTorch's CPU performance guide do). Where parameters are
    sharded (ZeRO-3, FSDP), memory is what the strategy is for, and layer after layer is gathered
    and freed: blocks over 128 KiB (glibc's initial threshold, kept fixed) go back to the OS at
    once, so a rank holds its shard and the layer at work, not the high-water mark of every
    transient (random-opt-125m, ZeRO-3, 2 ranks: 1.25 GB resident for 1.17 GB of model-state
    tensors; 2.0 GB with glibc's moving threshold, 2.9 GB with the heap kept)."""
    if torch.cuda.is_available():
        return {}
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return {"cpu_allocator": "default"}  # not glibc
    m_trim_threshold, m_mmap_threshold, m_mmap_max = -1, -3, -4  # <malloc.h>
    if shards_parameters(accelerator):
        libc.mallopt(m_mmap_threshold, 2**17)  # set, so glibc no longer raises it
        return {"cpu_allocator": "return blocks over 128 KiB"}
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)
    return {"cpu_allocator": "keep freed blocks"}


def shards_parameters(accelerator: Accelerator) -> bool:
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    return (accelerator.distributed_type == DistributedType.DEEPSPEED
            and accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage") == 3)


def release_freed_memory() -> None:
    """Give back what building, loading and sharding freed (a whole model's worth under ZeRO-3),
    before the loop."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def make_accelerator(cfg: RunConfig) -> Accelerator:
    requested = Requested.from_env()
    requested.refuse_model_parallelism()
    ddp = ddp_kwargs(cfg, requested.kind)  # refuses ddp.* keys where DDP does not run, before any process group
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
        fill_deepspeed_config(accelerator.state.deepspeed_plugin, cfg, accelerator.num_processes)
        # accelerate handed transformers (whose zero.Init partitions the model as it is built) a copy of
        # the JSON when the Accelerator was made, "auto" still unfilled: without the filled one, ZeRO-3's
        # NVMe parameter swap files went to ./none (accelerate's placeholder) instead of output_dir.
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()
        share_zero3_fp32_partitions()
        from deepspeed.accelerator import get_accelerator
        if accelerator.state.deepspeed_plugin.deepspeed_config.get("fp16", {}).get("enabled") is True \
                and not get_accelerator().is_fp16_supported():
            raise UserError(f"DeepSpeed's {get_accelerator().device_name()} accelerator has no fp16: launch with "
                            "--mixed_precision bf16 (or no), or use fsdp/ddp for fp16 here")
    elif on_cpu and requested.world_size > 1:
        # Without CUDA, a MULTI_GPU/FSDP config makes each process believe it is alone. Start the
        # gloo process group as MULTI_CPU first...
        PartialState(cpu=True, timeout=timeout)
        if requested.kind == "fsdp":
            # ...and, for FSDP, let AcceleratorState see a multi-device type: it only turns on FSDP
            # for those, and replaces this value with DistributedType.FSDP as it does.
            PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
        accelerator = Accelerator(cpu=True, kwargs_handlers=[ddp], **common)
    else:
        accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout), ddp], **common)

    if accelerator.distributed_type == DistributedType.FSDP:
        reduce_gradients_in_fp32(accelerator.state.fsdp_plugin)
    if accelerator.distributed_type == DistributedType.FSDP and on_cpu:
        from torch.distributed.fsdp import CPUOffloadPolicy
        plugin = accelerator.state.fsdp_plugin
        if isinstance(plugin.cpu_offload, CPUOffloadPolicy):  # pinned memory needs a GPU
            plugin.cpu_offload = CPUOffloadPolicy(pin_memory=False)
    enable_cpu_fp16(accelerator)
    return accelerator


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


def enable_cpu_fp16(accelerator: Accelerator) -> None:
    """accelerate turns on fp16 autocast and loss scaling only off CPU, and would silently train
    "fp16" in fp32; torch has both on CPU, so switch them on the way accelerate does on GPU
    (before `prepare`, which wraps the model's forward in autocast when `native_amp` is set)."""
    if (accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu"
            and accelerator.distributed_type != DistributedType.DEEPSPEED):
        accelerator.native_amp = True
        # torch's GradScaler works on CPU and on FSDP2's DTensor gradients alike
        accelerator.scaler = torch.amp.GradScaler("cpu")


def fill_deepspeed_config(plugin, cfg: RunConfig, num_processes: int) -> None:
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
    for key in DEEPSPEED_RUN_KEYS:
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
        from .model import layer_numel

        for key in ("stage3_max_live_parameters", "stage3_max_reuse_distance"):
            if zero.get(key) == "auto":
                zero[key] = 2 * layer_numel(cfg.model)
    # Exporting a consolidated model under ZeRO-3 needs the weights gathered on save.
    zero["stage3_gather_16bit_weights_on_model_save"] = True
    for offload in ("offload_param", "offload_optimizer"):
        section = zero.get(offload) or {}
        if section.get("device") == "nvme" and section.get("nvme_path") in (None, "auto", "none"):
            # Swap files belong to the run; DeepSpeed needs the folder to exist.
            section["nvme_path"] = str((Path(cfg.output_dir) / "nvme_offload").resolve())
            Path(section["nvme_path"]).mkdir(parents=True, exist_ok=True)


# optim.* keys a DeepSpeed "optimizer" section may leave "auto" (accelerate fills only lr and weight_decay).
DEEPSPEED_OPTIM_KEYS = {"lr": "lr", "weight_decay": "weight_decay", "betas": ("beta1", "beta2"), "eps": "eps"}


def check_optimizer(accelerator: Accelerator, cfg: RunConfig) -> None:
    """Right after `make_accelerator`, before any work: refuse an optimizer the strategy cannot run
    (or would silently replace), with what to use instead. For `optim.name=deepspeed`, the JSON's
    "auto" optimizer parameters take the run config's values, as its batch keys do."""
    name = cfg.optim.name
    if name in EIGHT_BIT:
        import_bitsandbytes(name)
    running = accelerator.distributed_type
    if running != DistributedType.DEEPSPEED:
        if name == "deepspeed":
            raise UserError(f"optim.name=deepspeed is the optimizer a DeepSpeed JSON defines, but this launch runs "
                            f"{running.value}, not DeepSpeed: launch with a DeepSpeed accelerate config whose JSON has "
                            'an "optimizer" section, or use optim.name=adamw')
        if name in EIGHT_BIT and running == DistributedType.FSDP:
            raise UserError(f"optim.name={name} cannot update FSDP2's sharded parameters (bitsandbytes fails with "
                            "'got mixed torch.Tensor and DTensor'): use optim.name=adamw with FSDP, or a DeepSpeed "
                            "config without optimizer offload (accelerate_configs/zero2.yaml) for 8-bit states")
        return

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
    for key, ours in DEEPSPEED_OPTIM_KEYS.items():
        run = [getattr(cfg.optim, k) for k in ours] if isinstance(ours, tuple) else getattr(cfg.optim, ours)
        value = params.get(key, "auto")
        if value == "auto":
            params[key] = run
        elif (list(value) if isinstance(value, (list, tuple)) else value) != run:
            keys = "/".join(f"optim.{k}" for k in ours) if isinstance(ours, tuple) else f"optim.{ours}"
            raise UserError(f'{source} sets optimizer.params.{key}={value} but the run config has {keys}={run}: '
                            f'set "{key}": "auto" there so the run config decides')


def checkpoint_layout(accelerator: Accelerator) -> str:
    """The layout `save_state` writes under this strategy (see checkpoint.layout)."""
    return {DistributedType.DEEPSPEED: "deepspeed", DistributedType.FSDP: "fsdp"}.get(accelerator.distributed_type,
                                                                                      "full")


def master_state_dict(accelerator: Accelerator, model) -> dict:
    """All ranks: the trained weights as the optimizer holds them (fp32 masters), whole, on the main
    process; named as the unwrapped model names them. No rank holds the whole model but the main.

    accelerate's `get_state_dict` gathers ZeRO-3 / FSDP shards, but under DeepSpeed with bf16/fp16
    it gives the engine's 16-bit working copies, while DDP and FSDP give fp32. The fp32 masters
    sit in ZeRO's flat optimizer partitions: gathered here one parameter at a time."""
    state_dict = accelerator.get_state_dict(model)
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return state_dict
    unwrapped = accelerator.unwrap_model(model)
    if all(p.dtype == torch.float32 for p in unwrapped.parameters()):
        return state_dict
    from deepspeed.utils import safe_get_full_fp32_param

    for name, param in unwrapped.named_parameters():
        master = safe_get_full_fp32_param(param)  # all ranks (an all-gather); None for frozen weights
        if master is not None and accelerator.is_main_process:
            state_dict[name] = master.cpu()
    return state_dict


def shard_before_optimizer(accelerator: Accelerator, model):
    """FSDP: shard the model now, so the optimizer is built on the shards.

    accelerate shards inside `prepare` and then re-points the optimizer from each old parameter
    to its shard by data pointer; a model born on the meta device (a preset), or left there on the
    other ranks by a memory-efficient checkpoint load, has every pointer 0. Sharded here with
    accelerate's own function, the model arrives in `prepare` already an FSDP module, which
    `prepare` keeps as it is."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return model
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


def init_device(accelerator: Accelerator) -> torch.device:
    """Where a preset's parameters are materialised: the device, or the CPU under FSDP offload."""
    from torch.distributed.fsdp import CPUOffloadPolicy

    plugin = accelerator.state.fsdp_plugin if accelerator.distributed_type == DistributedType.FSDP else None
    return torch.device("cpu") if plugin and isinstance(plugin.cpu_offload, CPUOffloadPolicy) else accelerator.device


@contextmanager
def whole_parameter(param: torch.nn.Parameter):
    """The whole of `param`, to write its initial values into, whoever holds which part of it
    (see model.initialize_weights): None on a rank that need not write."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if hasattr(param, "ds_id"):  # ZeRO-3: gathered; rank 0 writes, DeepSpeed re-partitions on exit
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            yield param.data if torch.distributed.get_rank() == 0 else None
    elif isinstance(param, DTensor):  # FSDP: every rank draws the same whole and keeps its shard
        whole = torch.empty(param.shape, dtype=param.dtype, device=param.to_local().device)
        yield whole
        # src_data_rank=None: no broadcast, each rank slices its own (identical) copy
        shard = distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(shard.to_local())
    else:
        yield param.data


def json_scheduler(accelerator: Accelerator) -> bool:
    """Whether a DeepSpeed JSON defines the LR schedule (a "scheduler" section; optim.name=deepspeed only)."""
    return (accelerator.distributed_type == DistributedType.DEEPSPEED
            and "scheduler" in accelerator.state.deepspeed_plugin.deepspeed_config)


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
    local, full = sharded_numel(model)
    sharded = requested.world_size > 1 and local < full
    info: dict = {"num_processes": accelerator.num_processes, "distributed_type": str(running.value),
                  "device": accelerator.device.type, "params_local_numel": local, "params_numel": full}
    if requested.kind == "deepspeed":
        import deepspeed
        if running != DistributedType.DEEPSPEED or not isinstance(model, deepspeed.DeepSpeedEngine):
            fail(f"accelerate runs {running.value} without a DeepSpeed engine")
        stage = model.zero_optimization_stage()
        wanted_stage = accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"].get("stage", 0)
        if stage != wanted_stage:
            fail(f"DeepSpeed runs ZeRO stage {stage}, not {wanted_stage}")
        if stage == 3 and requested.world_size > 1 and not sharded:
            fail(f"ZeRO-3 left the parameters unsharded ({local} of {full} elements on this rank)")
        if _offload_device(model.zero_offload_optimizer()) == "nvme" and local * 4 < MIN_AIO_BYTES:
            # DeepSpeed keeps optimizer partitions under 1 MiB in memory and then cannot restore
            # them from a checkpoint: NVMe offload would be neither real nor resumable.
            raise UserError(f"NVMe optimizer offload needs at least {MIN_AIO_BYTES} bytes of fp32 state per rank; "
                            f"this model has {local * 4}: use accelerate_configs/zero3_offload.yaml for a model this small")
        if stage == 3 and _offload_device(model.zero_offload_optimizer()) == "none":
            info["zero3_fp32_masters"] = "the parameters" if masters_are_parameters(model.optimizer) else "a copy"
        info.update(zero_stage=stage, grad_reduce_dtype=_dtype_name(model.communication_data_type),
                    offload_optimizer=_offload_device(model.zero_offload_optimizer()),
                    offload_param=_offload_device(model.zero_offload_param()),
                    mixed_precision="bf16" if model.bfloat16_enabled() else "fp16" if model.fp16_enabled() else "no")
    elif requested.kind == "fsdp":
        from torch.distributed.fsdp import CPUOffloadPolicy
        if running != DistributedType.FSDP:
            fail(f"accelerate runs {running.value}, not FSDP")
        if requested.world_size > 1 and not sharded:
            fail(f"FSDP left the parameters unsharded ({local} of {full} elements on this rank)")
        plugin = accelerator.state.fsdp_plugin
        policy = plugin.mixed_precision_policy
        info.update(grad_reduce_dtype=_dtype_name(policy and (policy.reduce_dtype or policy.param_dtype)
                                                  or next(model.parameters()).dtype),
                    fsdp_version=plugin.fsdp_version, reshard_after_forward=bool(plugin.reshard_after_forward),
                    offload_param=isinstance(plugin.cpu_offload, CPUOffloadPolicy))
        info.update(fsdp_mesh(accelerator, model, requested.mesh, fail))
    elif requested.kind == "ddp":
        if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
            fail(f"accelerate runs {running.value} without DistributedDataParallel")
        # Under autocast the gradients are the fp32 parameters'; a compression hook sends them in 16 bits.
        hooked = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.ddp.comm_hook)
        info["grad_reduce_dtype"] = _dtype_name(hooked or next(model.parameters()).dtype)
    else:
        info["grad_reduce_dtype"] = "none"  # one process: nothing is reduced
    if "mixed_precision" not in info:
        info["mixed_precision"] = accelerator.mixed_precision
        if accelerator.mixed_precision != "no" and not accelerator.native_amp:
            fail(f"{accelerator.mixed_precision} autocast is off")
    info.update(micro_batch_size=cfg.train.micro_batch_size, grad_accum_steps=cfg.train.grad_accum_steps,
                global_batch_size=cfg.train.global_batch_size(accelerator.num_processes),
                optimizer=type(innermost(optimizer)).__name__, versions=versions())
    return info


def fsdp_mesh(accelerator: Accelerator, model, asked: dict[str, int], fail) -> dict:
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


def masters_are_parameters(zero3_optimizer) -> bool:
    """Whether ZeRO-3 updates the fp32 parameter partitions in place (see share_zero3_fp32_partitions)."""
    return all(master.data_ptr() == param.data_ptr() for master, param in
               zip(zero3_optimizer.fp32_partitioned_groups_flat, zero3_optimizer.fp16_partitioned_groups_flat))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _offload_device(offload_config) -> str:
    device = getattr(offload_config, "device", None)
    return str(getattr(device, "value", device) or "none")


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
