"""Which accelerate config fits a model: memory per GPU, per process on the host, per node, offline.

    python -m toolkit.plan --model facebook/opt-13b --num-gpus 8 --gpu-memory 40 --cpu-memory 512
    python -m toolkit.plan --config examples/opt1.3b_lora_alpaca.yaml \\
        --accelerate-config accelerate_configs/zero3.yaml --num-gpus 8 --gpu-memory 40 --cpu-memory 512

reads every accelerate_configs/*.yaml (or the one given) and the DeepSpeed JSON it points to,
estimates what one process holds on its GPU and on the host when the job starts and while it
trains, says whether that fits and prints the launch command of the simplest config that does.
`--config` takes the model, micro batch, block size, checkpointing, LoRA and optimizer from the
run config the job will use. Pure arithmetic: no GPU, no network, no torch at import.

Model states, after the ZeRO paper (Rajbhandari et al.) and DeepSpeed's estimators, per trained
parameter (N of them, T trained; S = optimizer state: 8 for AdamW, 2 for 8-bit Adam), over the
G processes a strategy shards across:
  single, ddp: 4 weight + 4 gradient + S, whole (autocast keeps fp32 weights; a LoRA base frozen
      in the compute dtype). DDP's gradients are its all-reduce buckets, allocated at start.
  FSDP: the same sharded /G; without reshard after forward plus the whole model in compute dtype.
  DeepSpeed casts the model to w = 2 bytes in bf16/fp16 (4 in fp32) and keeps per trained
      parameter a gradient partition, an fp32 master (4/G; in fp32 ZeRO-3 the toolkit updates the
      parameters themselves) and S/G. ZeRO-3's gradient partition is in the model's dtype (w/G;
      4/G with data_types.grad_accum_dtype fp32); ZeRO-1/2 keep 16-bit gradients, whole under
      ZeRO-1, /G under ZeRO-2, and an fp32 partition of them (4/G). Weights /G under ZeRO-3.
  Optimizer offload moves gradient partition, master and state to the host (ZeRO-3's CPU Adam
  creates its state in `prepare`; otherwise the first step makes it), parameter offload the weights;
  ZeRO-1/2's offload also keeps a 16-bit copy of the stepped partition there (w/G). With NVMe the
  states go to disk, with the optimizer's fp32 gradients (4/G), and the host keeps the gradient
  partition and DeepSpeed's pinned buffers: the parameter swap buffers (buffer_count x buffer_size,
  "auto" sized to the largest parameter), the flat parameter buffer (up to max_in_cpu elements) and
  the optimizer's swap buffers (buffer_count x its largest sub-group). A checkpoint copies the
  optimizer's swap files (12 bytes per trained parameter) into output_dir.
  ZeRO-3 and FSDP gather a working set: two decoder layers or the embeddings, weights and gradients.
  ZeRO-1/2 copy gradients into an IPG bucket to reduce them (reduce_bucket_size elements, 5e8 unless
  the JSON says; "auto" is accelerate's hidden_size^2; ZeRO-1 all-reduces a flattened copy). On CPU they hold the module's weights beside
  the flat buffer DeepSpeed copies them into at start (a GPU does only when both fit: otherwise
  DeepSpeed flattens on the host, a group at a time), and gloo all-gathers their weights after each
  step through a whole-model buffer of its own (NCCL gathers in place).
Host per process: the process itself (PROCESS_BYTES: Python with torch, transformers, accelerate
and DeepSpeed loaded, measured on CPU; a CUDA context adds more, inside the headroom) and, while a
pretrained model loads, its fp32 copy where nothing shards it at birth (single, ddp, ZeRO-1/2;
the main process only under FSDP's cpu_ram_efficient_loading; ZeRO-3's zero.Init reads one
parameter at a time). The built-in random presets are built sharded: no such copy.

Activations per GPU (Korthikanti et al., "Reducing Activation Recomputation in Large Transformer
Models"): 34 * s * b * h bytes per layer in 16-bit, twice that in fp32; the attention scores
(their 5*a*s^2*b term) are not stored by SDPA. With activation checkpointing a layer keeps its
input and one layer is recomputed at a time. The fused loss (toolkit/loss.py) keeps no logits: one
chunk of fp32 logits at a time (at most 256 MiB), the hidden states' gradient and, when the head
is trained, its weight's gradient.

Fits: each figure at most 90% of --gpu-memory and of --cpu-memory per node (the 10% covers the CUDA
context, communication buckets, prefetch and fragmentation). Recommended: the first that fits,
least communication and fewest moving parts first: single (one GPU only), ddp, zero1, zero2 / FSDP
without reshard, FSDP / zero3, then optimizer offload, parameter offload, NVMe last.
`--device cpu` plans a CPU run (the toolkit's CPU mode): device and host are the same memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml

from .config import UserError, run_cli
from .shapes import OPT_SIZES, PRESETS, largest_parameter_numel, opt_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "accelerate_configs"
GIB = 2**30
HEADROOM = 0.10
PROCESS_BYTES = int(0.5 * GIB)  # capacity.json's before_model_gb: 0.46-0.53 per process on CPU
LOSS_CHUNK_BYTES = 256 * 2**20  # toolkit.loss.CHUNK_BYTES (not imported: it needs torch)
OPTIMIZER_STATE = {"adamw": 8, "deepspeed": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2}
LORA_SHAPES = {"q_proj": ("h", "h"), "k_proj": ("h", "h"), "v_proj": ("h", "h"), "out_proj": ("h", "h"),
               "fc1": ("h", "f"), "fc2": ("f", "h")}
# DeepSpeed's defaults for what a JSON leaves out (deepspeed.runtime.zero.offload_config, .config)
DS_DEFAULTS = {"param_buffer_count": 5, "param_buffer_size": 10**8, "max_in_cpu": 10**9, "optimizer_buffer_count": 4,
               "sub_group_size": 10**9, "reduce_bucket_size": 5 * 10**8}


def resolve_model(name: str) -> tuple[dict, bool]:
    """An OPT config dict from a local HF directory, a built-in preset or an OPT size (hub configs
    need the network), and whether the toolkit builds it sharded at birth (a random preset)."""
    if name in PRESETS:
        return {"model_type": "opt", "do_layer_norm_before": True, **PRESETS[name]}, True
    path = Path(name)
    if not path.is_dir():
        size = name.lower().removeprefix("facebook/").removeprefix("opt-")
        if size in OPT_SIZES:
            return opt_config(size), False
        raise UserError(f"unknown model {name!r}: neither an OPT size ({', '.join(OPT_SIZES)}), a preset "
                        f"({', '.join(PRESETS)}) nor a local directory, and hub configs are not fetched: pass an OPT "
                        "size or the model's directory (with config.json)")
    if not (path / "config.json").is_file():
        raise UserError(f"{name} has no config.json: pass a Hugging Face model directory or an OPT size")
    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") != "opt":
        raise UserError(f"{name} is a {config.get('model_type')} model; this toolkit trains OPT models only: pass an OPT model")
    config.setdefault("word_embed_proj_dim", config.get("hidden_size"))
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim",
                           "max_position_embeddings") if k not in config]
    if missing:
        raise UserError(f"{path / 'config.json'} lacks {', '.join(missing)}: pass a complete OPT config")
    return config, False


def count_params(c: dict) -> tuple[int, int, int]:
    """(parameters of OPTForCausalLM as transformers builds it, params of one decoder layer,
    of the embeddings). The lm_head is tied to embed_tokens unless tie_word_embeddings is false."""
    h, f, p, vocab = c["hidden_size"], c["ffn_dim"], c["word_embed_proj_dim"], c["vocab_size"]
    bias = 1 if c.get("enable_bias", True) else 0
    norm = 2 * h if c.get("layer_norm_elementwise_affine", True) else 0
    layer = 4 * (h * h + bias * h) + (h * f + bias * f) + (f * h + bias * h) + 2 * norm
    embeddings = vocab * p + (c["max_position_embeddings"] + 2) * h  # OPT offsets positions by 2
    total = embeddings + c["num_hidden_layers"] * layer + (2 * h * p if p != h else 0)  # project_in/out
    total += norm if c.get("do_layer_norm_before", True) else 0
    total += 0 if c.get("tie_word_embeddings", True) else vocab * p
    return total, layer, embeddings


def lora_params(c: dict, r: int, targets: list[str]) -> int:
    """peft's LoRA: A (r x in) and B (out x r) for every target module of every layer."""
    dims = {"h": c["hidden_size"], "f": c["ffn_dim"]}
    unknown = sorted(set(targets) - set(LORA_SHAPES))
    if unknown:
        raise UserError(f"LoRA target {unknown[0]} is not an OPT linear layer: use {', '.join(LORA_SHAPES)}")
    return c["num_hidden_layers"] * sum(r * (dims[LORA_SHAPES[t][0]] + dims[LORA_SHAPES[t][1]]) for t in targets)


@dataclass
class Strategy:
    name: str
    kind: str  # single | ddp | fsdp | deepspeed
    stage: int = 0  # ZeRO stage; FSDP: 3 when it reshards after forward, else 2
    offload_optimizer: str = "none"  # none | cpu | nvme
    offload_param: str = "none"
    zero: dict | None = None  # the DeepSpeed JSON's zero_optimization section (NVMe buffer sizes)
    fp32_grad_accum: bool = False  # the JSON's data_types.grad_accum_dtype (DeepSpeed's default: the model's)
    hybrid: bool = False  # FSDP2 hybrid shard (HSDP): sharded within a node, replicated across nodes
    mixed_precision: str = "no"  # the config's own; --mixed-precision at launch overrides it
    sharded_at_birth: bool = False  # zero3_init_flag / fsdp_cpu_ram_efficient_loading

    def order(self) -> tuple:
        offload = 3 if "nvme" in (self.offload_optimizer, self.offload_param) else \
            2 if self.offload_param != "none" else 1 if self.offload_optimizer != "none" else 0
        return offload, -1 if self.kind == "single" else self.stage, self.hybrid, self.name


def read_strategy(path: Path) -> Strategy | None:
    """The strategy an accelerate config asks for; None for types this toolkit does not run."""
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"cannot read the accelerate config {path} ({e.__class__.__name__}): pass a YAML file "
                        "written by `accelerate config`, like those in accelerate_configs/") from None
    kind = str(cfg.get("distributed_type", "NO"))  # unquoted NO is YAML for False
    precision = str(cfg.get("mixed_precision", "no")).lower()
    if kind in ("NO", "False"):
        return Strategy(path.stem, "single", mixed_precision=precision)
    if kind.startswith("MULTI_"):
        return Strategy(path.stem, "ddp", mixed_precision=precision)
    if kind == "FSDP":
        fsdp = cfg.get("fsdp_config") or {}
        reshard = fsdp.get("fsdp_reshard_after_forward", fsdp.get("fsdp_sharding_strategy", True))
        offload = "cpu" if str(fsdp.get("fsdp_offload_params", False)).lower() == "true" else "none"
        # FSDP's CPU offload keeps the sharded parameters, gradients and optimizer step all on CPU.
        hybrid = int((cfg.get("parallelism_config") or {}).get("parallelism_config_dp_replicate_size", 1) or 1) > 1
        return Strategy(path.stem, "fsdp", 3 if str(reshard).upper() in ("TRUE", "FULL_SHARD", "1") else 2,
                        offload, offload, hybrid=hybrid, mixed_precision=precision,
                        sharded_at_birth=str(fsdp.get("fsdp_cpu_ram_efficient_loading", True)).lower() == "true")
    if kind != "DEEPSPEED":
        return None
    ds = cfg.get("deepspeed_config") or {}
    init = str(ds.get("zero3_init_flag", False)).lower() == "true"
    if ds.get("deepspeed_config_file"):
        file = Path(ds["deepspeed_config_file"])
        file = file if file.is_absolute() else ROOT / file  # relative to the repository, where launches run
        if not file.is_file():
            raise UserError(f"{path} points to {file}, which does not exist: fix deepspeed_config_file")
        written = json.loads(file.read_text())
        zero = written.get("zero_optimization", {})
        device = lambda key: (zero.get(key) or {}).get("device") or "none"  # noqa: E731
        fp32_grads = str((written.get("data_types") or {}).get("grad_accum_dtype")).lower() in ("fp32", "float32")
        return Strategy(path.stem, "deepspeed", int(zero.get("stage", 0)), device("offload_optimizer"),
                        device("offload_param"), zero, fp32_grads, mixed_precision=precision, sharded_at_birth=init)
    return Strategy(path.stem, "deepspeed", int(ds.get("zero_stage", 0)), ds.get("offload_optimizer_device", "none"),
                    ds.get("offload_param_device", "none"), {}, mixed_precision=precision, sharded_at_birth=init)


@dataclass
class Job:
    """What will be launched: the model and the run config's settings, the machines."""
    name: str  # as model.name_or_path takes it
    model: dict  # its config.json fields
    preset: bool  # built sharded at birth by the toolkit: no whole fp32 copy while loading
    micro_batch: int
    seq_len: int
    checkpointing: bool
    optim: str
    lora_r: int
    lora_targets: list
    mixed_precision: str | None  # None: each accelerate config's own
    gpus: int  # per node
    nodes: int
    device: str  # cuda | cpu


def activations(c: dict, job: Job, half: bool, head_trained: bool) -> int:
    s, b, h, layers = job.seq_len, job.micro_batch, c["hidden_size"], c["num_hidden_layers"]
    layer = 34 * s * b * h * (1 if half else 2)
    kept = layers * s * b * h * (2 if half else 4) + layer if job.checkpointing else layers * layer
    loss = min(s * b * c["vocab_size"] * 4, LOSS_CHUNK_BYTES) + s * b * h * 4
    loss += c["vocab_size"] * c["word_embed_proj_dim"] * 4 if head_trained else 0
    return int(kept + loss)


def estimate(s: Strategy, job: Job, counts: tuple[int, int, int], largest: int) -> dict:
    """Bytes one process holds on its GPU and on the host, at start and in training, and per node
    (see the module doc)."""
    n, t, unit = counts  # parameters, trained parameters, the largest gathered unit
    gpus = 1 if s.kind == "single" else job.gpus * job.nodes
    shards = job.gpus if s.hybrid else gpus  # HSDP shards within a node
    precision = job.mixed_precision or s.mixed_precision
    half = precision in ("bf16", "fp16")
    opt = OPTIMIZER_STATE[job.optim]
    device, host, disk = {"start": 0.0, "training": 0.0}, {"start": 0.0, "training": 0.0}, 0.0

    def place(where: str, nbytes: float, at_start: bool = True, in_training: bool = True):
        nonlocal disk
        if where == "nvme":
            disk += nbytes
            return
        memory = device if where == "none" else host
        memory["training"] += nbytes if in_training else 0
        memory["start"] += nbytes if at_start else 0

    zero = s.zero or {}
    if s.kind == "deepspeed":
        w = 2 if half else 4  # DeepSpeed casts the module
        parts = shards if s.stage >= 1 else 1
        master = 0 if s.stage == 3 and not half and s.offload_optimizer == "none" else 4
        place(s.offload_param, w * n / (shards if s.stage == 3 else 1))
        if s.stage < 3 and s.offload_optimizer == "none":  # 16-bit gradients (offload copies them out as reduced)
            place("none", w * t / (shards if s.stage == 2 else 1), at_start=False)
        moved = s.offload_optimizer
        # the gradient partition, pinned on the host when offloaded: ZeRO-3 accumulates in the model's
        # dtype unless told fp32; ZeRO-1/2 step their fp32 masters with an fp32 copy of it
        grad = 4 if s.stage < 3 or s.fp32_grad_accum else w
        place("cpu" if moved == "nvme" else moved, grad * t / parts)
        place(moved, master * t / parts)
        # ZeRO-3's CPU Adam makes its state in prepare; ZeRO-1/2 (and other optimizers) at the first step
        place(moved, opt * t / parts, at_start=moved == "cpu" and s.stage == 3)
        gather = 2 * w * unit if s.stage == 3 else 0
        if s.stage < 3:
            if job.device == "cpu":
                # the module's weights beside the flat buffer DeepSpeed copies them into (a GPU does that only
                # where both fit, else DeepSpeed flattens on the host: it never decides whether a GPU fits)
                place("none", w * n, in_training=False)
            if moved == "cpu":
                place("cpu", w * t / parts)  # the 16-bit copy of the stepped partition on its way to the device
            bucket = zero.get("reduce_bucket_size", DS_DEFAULTS["reduce_bucket_size"])
            bucket = job.model["hidden_size"] ** 2 if bucket == "auto" else int(float(bucket))  # accelerate's "auto"
            # the IPG bucket the gradients are copied into to be reduced; ZeRO-1 all-reduces a flattened copy of it
            gather += w * min(bucket, t) * (2 if s.stage == 1 else 1)
            # the weights are all-gathered into the flat buffer after each step: in place with NCCL,
            # while gloo (CPU) collects the whole output in a buffer of its own first
            gather += w * n if job.device == "cpu" else 0
        if s.offload_param == "nvme":
            param = zero.get("offload_param") or {}
            size = param.get("buffer_size", "auto")
            size = max(DS_DEFAULTS["param_buffer_size"], largest) if size == "auto" else int(size)
            place("cpu", w * param.get("buffer_count", DS_DEFAULTS["param_buffer_count"]) * size)
            place("cpu", w * min(param.get("max_in_cpu", DS_DEFAULTS["max_in_cpu"]), n / shards))
        if moved == "nvme":  # the optimizer swaps fp32 gradients out with its sub-groups
            place("nvme", 4 * t / parts)
            sub_group = min(int(zero.get("sub_group_size", DS_DEFAULTS["sub_group_size"])), t / parts)
            count = (zero.get("offload_optimizer") or {}).get("buffer_count", DS_DEFAULTS["optimizer_buffer_count"])
            place("cpu", 4 * count * max(sub_group, largest / parts))
    else:
        frozen_bytes = 2 if half else 4  # a LoRA base is kept in the compute dtype (runtime.param_dtypes)
        parts = shards if s.kind == "fsdp" else 1
        where = s.offload_param if s.kind == "fsdp" else "none"
        place(where, (4 * t + frozen_bytes * (n - t)) / parts)
        place(where, 4 * t / parts, at_start=s.kind == "ddp")  # DDP's buckets exist from the start
        place(where, opt * t / parts, at_start=False)
        compute = 2 if half else 4
        gather = 2 * compute * unit if s.kind == "fsdp" else 0
        gather += compute * n if s.kind == "fsdp" and s.stage == 2 else 0  # kept gathered until backward
    act = activations(job.model, job, half, head_trained=t == n)
    device["training"] += gather + act

    # host: the process, and the fp32 model while a pretrained one loads
    whole = s.kind in ("single", "ddp") or (s.kind == "deepspeed" and s.stage < 3) or not s.sharded_at_birth
    loading = 0 if job.preset else 4 * n if whole else 4 * largest if s.kind == "deepspeed" else 0
    main_loading = 0 if job.preset or whole or s.kind != "fsdp" else 4 * n  # read by the main process only
    if job.device == "cpu":  # one memory: the device's figures are the host's, the loaded model the trained one
        loading = 0 if whole else loading
        host = {k: host[k] + device[k] for k in host}
        device = {"start": 0, "training": 0}
    # the loaded copy is freed as the model moves to the GPU, before offloaded states are made
    host_start, host_training = PROCESS_BYTES + max(host["start"], loading), PROCESS_BYTES + host["training"]
    per_node = min(job.gpus, gpus)
    cpu = per_node * max(host_start, host_training) + main_loading
    return dict(config=s.name, strategy=s.kind, zero_stage=s.stage if s.kind == "deepspeed" else None, gpus=gpus,
                mixed_precision=precision, offload_optimizer=s.offload_optimizer, offload_param=s.offload_param,
                gpu_model_states_bytes=int(device["training"] - gather - act) if job.device == "cuda" else 0,
                gpu_buffers_bytes=int(gather), gpu_activations_bytes=act, gpu_start_bytes=int(device["start"]),
                gpu_total_bytes=int(device["training"]), host_start_bytes=int(host_start),
                host_training_bytes=int(host_training), cpu_per_node_bytes=int(cpu),
                nvme_per_node_bytes=int(disk * per_node))


def judge(row: dict, s: Strategy, job: Job, gpu_memory: float | None, cpu_memory: float) -> dict:
    """Whether a row fits, and why the planner would not recommend it anyway."""
    fits_gpu = job.device == "cpu" or max(row["gpu_start_bytes"], row["gpu_total_bytes"]) <= (1 - HEADROOM) * gpu_memory * GIB
    fits_cpu = row["cpu_per_node_bytes"] <= (1 - HEADROOM) * cpu_memory * GIB
    eight_bit, many = job.optim in ("adamw_8bit", "paged_adamw_8bit"), job.gpus * job.nodes > 1
    note = ("8-bit Adam is refused here (toolkit.strategy.check_optimizer)"
            if eight_bit and (s.kind == "fsdp" or (s.kind == "deepspeed" and s.offload_optimizer != "none"))
            else "optim.name=deepspeed needs a DeepSpeed config" if job.optim == "deepspeed" and s.kind != "deepspeed"
            else "uses 1 GPU: not recommended with more" if s.kind == "single" and many
            else "HSDP replicates across nodes: on one node it is fsdp" if s.hybrid and job.nodes == 1
            else None)
    return dict(row, gpu_total_gib=round(row["gpu_total_bytes"] / GIB, 2), cpu_per_node_gib=round(
        row["cpu_per_node_bytes"] / GIB, 2), fits_gpu=fits_gpu, fits_cpu=fits_cpu, fits=fits_gpu and fits_cpu and not note,
        note=note)


def launch_command(s: Strategy, job: Job, config_path: Path, run_config: str | None, overrides: list[str]) -> str:
    """The `accelerate launch` line that runs this plan."""
    path = os.path.relpath(config_path) if config_path.is_absolute() else str(config_path)
    cmd = ["accelerate", "launch", "--config_file", path]
    if s.kind != "single":
        cmd += ["--num_processes", str(job.gpus * job.nodes), "--num_machines", str(job.nodes)]
    if job.nodes > 1:
        cmd += ["--machine_rank", "$NODE_RANK", "--main_process_ip", "$MAIN_HOST", "--main_process_port", "29500"]
    if s.hybrid:  # sized from the GPU count: shards within a node, replicas across nodes
        cmd += ["--parallelism_config_dp_shard_size", str(job.gpus),
                "--parallelism_config_dp_replicate_size", str(job.nodes)]
    if job.mixed_precision:
        cmd += ["--mixed_precision", job.mixed_precision]
    cmd += ["-m", "toolkit.train", *(["--config", run_config] if run_config else []), *overrides]
    return shlex.join(cmd).replace("'$NODE_RANK'", "$NODE_RANK").replace("'$MAIN_HOST'", "$MAIN_HOST")


def plan(args) -> dict:
    job, overrides = make_job(args)
    n, layer, embeddings = count_params(job.model)
    t = lora_params(job.model, job.lora_r, job.lora_targets) if job.lora_r else n
    largest = largest_parameter_numel(job.model)
    paths = [Path(args.accelerate_config)] if args.accelerate_config else sorted(CONFIGS.glob("*.yaml"))
    strategies = sorted(((s, p) for p in paths for s in [read_strategy(p)] if s), key=lambda sp: sp[0].order())
    if not strategies:
        raise UserError(f"{paths[0]} is not a strategy this toolkit runs (single, DDP, FSDP or DeepSpeed): pass one of "
                        "accelerate_configs/*.yaml")
    cpu_memory = args.cpu_memory or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    rows = []
    for s, path in strategies:
        row = judge(estimate(s, job, (n, t, max(2 * layer, embeddings)), largest), s, job, args.gpu_memory, cpu_memory)
        row["launch"] = launch_command(s, job, path, args.config, overrides)
        rows.append(row)
    recommended = next((r for r in rows if r["fits"]), None)
    advice = [a for a, used in (("--lora 8", job.lora_r), ("--optim adamw_8bit", job.optim != "adamw"),
                                ("--gradient-checkpointing", job.checkpointing),
                                ("--mixed-precision bf16", job.mixed_precision in ("bf16", "fp16"))) if not used]
    advice += ["a smaller --micro-batch or --seq-len", "more --num-gpus or --num-nodes"]
    cpu_bound = [r for r in rows if r["fits_gpu"] and not r["fits_cpu"] and not r["note"]]
    if cpu_bound:  # the GPUs would do: say how much CPU memory the least hungry of those needs
        r = min(cpu_bound, key=lambda r: r["cpu_per_node_bytes"])
        advice.insert(0, f"--cpu-memory {r['cpu_per_node_bytes'] / (1 - HEADROOM) / GIB:.0f} or more ({r['config']})")
    return dict(model=job.name, params=n, trained_params=t, optim=job.optim,
                lora_r=job.lora_r, lora_targets=job.lora_targets if job.lora_r else [], micro_batch=job.micro_batch,
                seq_len=job.seq_len, gradient_checkpointing=job.checkpointing, mixed_precision=job.mixed_precision,
                device=job.device, num_gpus=job.gpus, num_nodes=job.nodes, gpu_memory_gib=args.gpu_memory,
                cpu_memory_gib=round(cpu_memory, 1), cpu_memory_assumed=not args.cpu_memory, headroom=HEADROOM,
                rows=rows, recommended=recommended["config"] if recommended else None,
                launch=recommended["launch"] if recommended else None, advice=[] if recommended else advice)


def make_job(args) -> tuple[Job, list[str]]:
    """The job from the flags, over the run config (--config) where one is given, and the run
    config overrides the launch command needs for what the flags changed."""
    from . import config as run_config

    if args.accelerate_config and not Path(args.accelerate_config).is_file():
        raise UserError(f"--accelerate-config {args.accelerate_config} does not exist: pass one of "
                        "accelerate_configs/*.yaml or your own")
    cfg = run_config.load(args.config) if args.config else run_config.RunConfig()
    given = {  # flag: (its value, the run config key, the run config's value)
        "model": (args.model, "model.name_or_path", cfg.model.name_or_path if args.config else None),
        "micro_batch": (args.micro_batch, "train.micro_batch_size", cfg.train.micro_batch_size),
        "seq_len": (args.seq_len, "data.block_size", cfg.data.block_size),
        "gradient_checkpointing": (args.gradient_checkpointing, "model.gradient_checkpointing",
                                   cfg.model.gradient_checkpointing),
        "optim": (args.optim, "optim.name", cfg.optim.name),
        "lora": (args.lora, "lora.r", cfg.lora.r if cfg.lora.enabled else 0),
        "lora_targets": (args.lora_targets, "lora.target_modules", cfg.lora.target_modules),
    }
    value = {k: flag if flag is not None else default for k, (flag, _, default) in given.items()}
    if value["model"] is None:
        raise UserError("no model: pass --model (an OPT size, a preset or a model directory) or --config RUN.yaml")
    overrides = [f"{key}={run_config._show(value[k])}" for k, (flag, key, default) in given.items()
                 if flag is not None and (flag != default or not args.config) and not k.startswith("lora")]
    if args.lora is not None and args.lora != given["lora"][2]:
        overrides += ["lora.enabled=true", f"lora.r={args.lora}"] if args.lora else ["lora.enabled=false"]
    if args.lora_targets is not None and value["lora"]:
        overrides.append(f"lora.target_modules={run_config._show(args.lora_targets)}")
    model, preset = resolve_model(value["model"])
    if not preset and not Path(value["model"]).is_dir() and not value["model"].startswith("facebook/"):
        value["model"] = f"facebook/opt-{value['model'].lower().removeprefix('opt-')}"  # an OPT size names its hub id
        overrides = [f"model.name_or_path={value['model']}" if o.startswith("model.name_or_path=") else o
                     for o in overrides]
    if args.accelerate_config and args.num_gpus is None:  # the config's process count, per node
        launch = yaml.safe_load(Path(args.accelerate_config).read_text()) or {}
        machines = int(launch.get("num_machines", 1) or 1)
        gpus, nodes = max(1, int(launch.get("num_processes", 1) or 1) // machines), args.num_nodes or machines
    else:
        gpus, nodes = args.num_gpus or 1, args.num_nodes or 1
    job = Job(name=value["model"], model=model, preset=preset, micro_batch=value["micro_batch"],
              seq_len=value["seq_len"], checkpointing=value["gradient_checkpointing"], optim=value["optim"],
              lora_r=value["lora"], lora_targets=list(value["lora_targets"]), mixed_precision=args.mixed_precision,
              gpus=gpus, nodes=nodes, device=args.device)
    return job, overrides


def print_table(p: dict) -> None:
    trained = "all trained" if p["trained_params"] == p["params"] else \
        f"{p['trained_params'] / 1e6:.2f}M trained (LoRA r={p['lora_r']} on {','.join(p['lora_targets'])})"
    size = f"{p['params'] / 1e9:.3f}B" if p["params"] >= 1e9 else f"{p['params'] / 1e6:.1f}M"
    print(f"{p['model']}: {size} parameters ({p['params']:,}), {trained}, {p['optim']}, "
          f"micro-batch {p['micro_batch']} x seq {p['seq_len']}"
          f"{', activation checkpointing' if p['gradient_checkpointing'] else ''}, "
          f"precision {p['mixed_precision'] or 'as each config says'}")
    assumed = " (assumed: this machine's; pass --cpu-memory for the training nodes)" if p["cpu_memory_assumed"] else ""
    where = f"{p['num_gpus']} GPU(s) x {p['gpu_memory_gib']:g} GiB" if p["device"] == "cuda" else \
        f"{p['num_gpus']} CPU process(es)"
    print(f"{where} on {p['num_nodes']} node(s), {p['cpu_memory_gib']:.0f} GiB CPU per node{assumed}; "
          f"fits: at most {1 - HEADROOM:.0%} of each. In GiB, per process unless per node:")
    head = ("config", "precision", "GPU start", "GPU train", "host start", "host train", "CPU/node", "NVMe/node", "fits")
    print(f"{head[0]:<20}{head[1]:>10}" + "".join(f"{h:>11}" for h in head[2:-1]) + f"  {head[-1]}")
    for r in p["rows"]:
        numbers = (r["gpu_start_bytes"], r["gpu_total_bytes"], r["host_start_bytes"], r["host_training_bytes"],
                   r["cpu_per_node_bytes"], r["nvme_per_node_bytes"])
        fits = ("yes" if r["fits"] else "no") + (f" ({r['note']})" if r["note"] else "")
        cells = [f"{x / GIB:.1f}" for x in numbers]
        if p["device"] == "cpu":  # no GPU: the host holds everything
            cells[:2] = ["-", "-"]
        print(f"{r['config']:<20}{r['mixed_precision']:>10}" + "".join(f"{c:>11}" for c in cells) + f"  {fits}")
    if p["recommended"]:
        print(f"recommended: {p['recommended']}\n  {p['launch']}")
    else:
        print(f"nothing fits: try {', '.join(p['advice'])}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="toolkit.plan", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="OPT size (1.3b, opt-13b), hub id of one, preset (random-opt-1.3b) or a local "
                                        "model directory (default: --config's model.name_or_path)")
    parser.add_argument("--config", help="the run config the job will use: model, micro batch, block size, "
                                         "checkpointing, LoRA and optimizer come from it (flags override)")
    parser.add_argument("--accelerate-config", help="plan this accelerate config only (default: every one in "
                                                    "accelerate_configs/); its num_processes sets --num-gpus")
    parser.add_argument("--num-gpus", type=int, help="GPUs (processes) per node (default 1)")
    parser.add_argument("--num-nodes", type=int, help="(default 1)")
    parser.add_argument("--gpu-memory", type=float, help="GiB per GPU (required unless --device cpu)")
    parser.add_argument("--cpu-memory", type=float, help="GiB of RAM per node (default: this machine's, stated "
                                                         "as an assumption)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: plan a CPU run")
    parser.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"),
                        help="as given to accelerate launch (default: each config's own, fp32 where it says none)")
    parser.add_argument("--lora", type=int, metavar="R", help="LoRA rank (0: full fine-tuning)")
    parser.add_argument("--lora-targets", type=lambda v: v.split(","), metavar="M,M",
                        help=f"LoRA target modules (default q_proj,v_proj): any of {','.join(LORA_SHAPES)}")
    parser.add_argument("--optim", choices=tuple(OPTIMIZER_STATE), help="optim.name (default adamw)")
    parser.add_argument("--micro-batch", type=int, help="sequences per GPU: train.micro_batch_size (default 8)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence: data.block_size (default 128)")
    parser.add_argument("--gradient-checkpointing", action="store_true", default=None,
                        help="model.gradient_checkpointing=true")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args(argv)
    if args.device == "cuda" and args.gpu_memory is None:
        raise UserError("--gpu-memory is required: pass the GiB of one GPU (or --device cpu to plan a CPU run)")
    for name in ("num_gpus", "num_nodes", "micro_batch", "seq_len", "gpu_memory", "cpu_memory"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}: pass a positive value")
    if args.lora is not None and args.lora < 0:
        raise UserError(f"--lora must be a LoRA rank >= 1 (or 0 for full fine-tuning), got {args.lora}")
    result = plan(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)


if __name__ == "__main__":
    run_cli(main)
