"""Which accelerate config fits a model: per-GPU and per-node memory of every strategy, offline.

`python -m toolkit.plan --model facebook/opt-13b --num-gpus 8 --gpu-memory 40` reads every
accelerate_configs/*.yaml (and the DeepSpeed JSON it points to), estimates its memory, says whether
it fits and recommends one. Pure arithmetic: no GPU, no network, no torch at import.

Model states, after the ZeRO paper (Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training
Trillion Parameter Models"), for N trained parameters on G = GPUs x nodes: mixed-precision Adam keeps
2 bytes of 16-bit weights + 2 of 16-bit gradients + K of optimizer state (K = 12: fp32 master, m, v;
8-bit Adam: K = 6, fp32 master + two 1-byte moments). Per GPU, with K = 12:
    single, ddp: 16N     zero1: 4N + 12N/G     zero2: 2N + 14N/G     zero3, FSDP full shard: 16N/G
    FSDP without reshard after forward: 16N/G + 2N (16-bit weights stay gathered until backward)
single, ddp and FSDP run autocast on fp32 weights: the same 16 bytes split 4 + 4 + 8, which matters
for LoRA only: its frozen base costs only its weights, 4 bytes there and 2 under DeepSpeed (which
casts the model). LoRA trains r*(in+out) per q_proj and v_proj: 4*r*hidden per layer.
Offload to cpu (per node: its GPUs' partitions): optimizer -> the K bytes plus 4 of fp32 gradients
(ZeRO-2/3 gradients leave the GPU too); params -> the weights too; FSDP offloads all three; nvme ->
the same on disk, leaving DeepSpeed's pinned swap buffers in CPU memory. ZeRO-3 and FSDP also gather
one unit (a decoder layer or the embeddings) in 16-bit with its gradients: 4 bytes per parameter.

Activations per GPU (Korthikanti et al., "Reducing Activation Recomputation in Large Transformer
Models"): per layer s*b*h*(34 + 5*a*s/h) bytes in 16-bit (s = seq-len, b = micro-batch, h = hidden,
a = heads), plus the fp32 logits and their gradient, b*s*vocab*4*2. With activation checkpointing a
layer keeps its 16-bit input, 2*s*b*h, and one layer is recomputed at a time. The 5*a*s/h term
(attention scores) is an upper bound: SDPA / flash attention does not store them.

Fits: GPU total (states + buffers + activations) <= 90% of --gpu-memory and CPU per node <= 90% of
--cpu-memory; the 10% covers the CUDA context, communication buckets (DDP, ZeRO-1/2), prefetch and
fragmentation. Not counted: the fp32 model each process builds while loading (not under ZeRO-3
init). Recommended: the first that fits, least communication and fewest moving parts first: single
(one GPU only), ddp, zero1, zero2 / FSDP without reshard, FSDP / zero3, then optimizer offload,
param offload, NVMe last; ties by name.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from .config import UserError, run_cli
from .shapes import OPT_SIZES, opt_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "accelerate_configs"
GIB = 2**30
HEADROOM = 0.10
def resolve_model(name: str) -> dict:
    """An OPT config dict from a local HF directory or a built-in size (hub configs need the network)."""
    path = Path(name)
    if not path.is_dir():
        size = name.lower().removeprefix("facebook/").removeprefix("random-").removeprefix("opt-")
        if size in OPT_SIZES:
            return opt_config(size)
        raise UserError(f"unknown model {name!r}: neither an OPT size ({', '.join(OPT_SIZES)}) nor a local directory, and "
                        "hub configs are not fetched: pass an OPT size or the model's directory (with config.json)")
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
    return config


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


@dataclass
class Strategy:
    name: str
    kind: str  # single | ddp | fsdp | deepspeed
    stage: int = 0  # ZeRO stage; FSDP: 3 when it reshards after forward, else 2
    offload_optimizer: str = "none"  # none | cpu | nvme
    offload_param: str = "none"
    zero: dict | None = None  # the DeepSpeed JSON's zero_optimization section (NVMe buffer sizes)
    dp_shard: int = 0  # FSDP2 hybrid shard (HSDP): ranks one copy is sharded over (0: all of them)

    def order(self) -> tuple:
        offload = 3 if "nvme" in (self.offload_optimizer, self.offload_param) else \
            2 if self.offload_param != "none" else 1 if self.offload_optimizer != "none" else 0
        return offload, -1 if self.kind == "single" else self.stage, self.name


def read_strategy(path: Path) -> Strategy | None:
    """The strategy an accelerate config asks for; None for types this toolkit does not run."""
    cfg = yaml.safe_load(path.read_text()) or {}
    kind = str(cfg.get("distributed_type", "NO"))  # unquoted NO is YAML for False
    if kind in ("NO", "False"):
        return Strategy(path.stem, "single")
    if kind.startswith("MULTI_"):
        return Strategy(path.stem, "ddp")
    if kind == "FSDP":
        fsdp = cfg.get("fsdp_config") or {}
        reshard = fsdp.get("fsdp_reshard_after_forward", fsdp.get("fsdp_sharding_strategy", True))
        offload = "cpu" if str(fsdp.get("fsdp_offload_params", False)).lower() == "true" else "none"
        # FSDP's CPU offload keeps the sharded parameters, gradients and optimizer step all on CPU.
        # HSDP (a parallelism_config section): each dp_replicate group holds a whole copy, sharded over dp_shard ranks.
        dp_shard = int((cfg.get("parallelism_config") or {}).get("parallelism_config_dp_shard_size", 0) or 0)
        return Strategy(path.stem, "fsdp", 3 if str(reshard).upper() in ("TRUE", "FULL_SHARD", "1") else 2,
                        offload, offload, dp_shard=dp_shard)
    if kind != "DEEPSPEED":
        return None
    ds = cfg.get("deepspeed_config") or {}
    if ds.get("deepspeed_config_file"):
        file = Path(ds["deepspeed_config_file"])
        file = file if file.is_absolute() else ROOT / file  # relative to the repository, where launches run
        if not file.is_file():
            raise UserError(f"{path} points to {file}, which does not exist: fix deepspeed_config_file")
        zero = json.loads(file.read_text()).get("zero_optimization", {})
        device = lambda key: (zero.get(key) or {}).get("device") or "none"  # noqa: E731
        return Strategy(path.stem, "deepspeed", int(zero.get("stage", 0)), device("offload_optimizer"),
                        device("offload_param"), zero)
    return Strategy(path.stem, "deepspeed", int(ds.get("zero_stage", 0)), ds.get("offload_optimizer_device", "none"),
                    ds.get("offload_param_device", "none"), {})


def activations(c: dict, micro_batch: int, seq: int, checkpointing: bool) -> int:
    h, layers, heads = c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"]
    layer = seq * micro_batch * h * (34 + 5 * heads * seq / h)
    kept = layers * 2 * seq * micro_batch * h + layer if checkpointing else layers * layer
    return int(kept + micro_batch * seq * c["vocab_size"] * 4 * 2)


def estimate(s: Strategy, trained: int, frozen: int, unit: int, act: int, args) -> dict:
    """Bytes per GPU, and per node of CPU memory and NVMe, for one strategy (see the module doc)."""
    gpus, per_node = (1, 1) if s.kind == "single" else (args.num_gpus * args.num_nodes, args.num_gpus)
    ds = s.kind == "deepspeed"
    k = 12 if args.optim == "adamw" else 6
    w, g, o = (2, 2, k) if ds else (4, 4, k - 4)  # autocast keeps fp32 weights: no separate master copy
    weights, grads, optim = w * (trained + frozen), g * trained, o * trained
    host = {}  # bytes per rank moved off the GPU, by offload device
    if s.kind == "fsdp":
        gathered = 0 if s.stage == 3 else 2 * (trained + frozen)
        shards = min(s.dp_shard, gpus) if s.dp_shard else gpus
        gpu = (weights + grads + optim) / shards + gathered
        if s.offload_param != "none":
            gpu, host["cpu"] = gathered, (weights + grads + optim) / shards
    else:
        part_w, part_g, part_o = (x / gpus if s.stage >= n else x for x, n in ((weights, 3), (grads, 2), (optim, 1)))
        gpu = part_w + part_g + part_o
        if s.offload_optimizer != "none":  # DeepSpeed's CPU Adam steps fp32 gradients kept beside its state
            gpu -= part_o + (part_g if s.stage >= 2 else 0)
            host[s.offload_optimizer] = (o + 4) * trained / gpus
        if s.offload_param != "none":
            gpu -= part_w
            host[s.offload_param] = host.get(s.offload_param, 0) + part_w
    cpu, disk, zero = host.get("cpu", 0), host.get("nvme", 0), s.zero or {}
    if s.offload_optimizer == "nvme":  # pinned fp32 swap buffers of one optimizer sub-group each
        cpu += (zero.get("offload_optimizer") or {}).get("buffer_count", 4) * 4 * min(
            zero.get("sub_group_size", 10**9), trained / gpus)
    if s.offload_param == "nvme":  # pinned 16-bit parameter swap buffers
        param = zero.get("offload_param") or {}
        cpu += param.get("buffer_count", 5) * param.get("buffer_size", 10**8) * 2
    buffers = 4 * unit if s.kind == "fsdp" or (ds and s.stage == 3) else 0
    gpu_total, cpu = gpu + buffers + act, cpu * per_node
    refused = args.optim == "adamw_8bit" and (s.kind == "fsdp" or (ds and s.offload_optimizer != "none"))
    note = "8-bit Adam is refused here, see toolkit.strategy.check_optimizer" if refused else \
        "uses 1 GPU: not recommended with more" if s.kind == "single" and args.num_gpus * args.num_nodes > 1 else None
    fits_gpu = gpu_total <= (1 - HEADROOM) * args.gpu_memory * GIB
    fits_cpu = cpu <= (1 - HEADROOM) * args.cpu_memory * GIB
    return dict(config=s.name, strategy=s.kind, zero_stage=s.stage if ds else None, gpus=gpus,
                offload_optimizer=s.offload_optimizer, offload_param=s.offload_param,
                gpu_model_states_bytes=int(gpu), gpu_buffers_bytes=buffers, gpu_activations_bytes=act,
                gpu_total_bytes=int(gpu_total), gpu_total_gib=round(gpu_total / GIB, 2), cpu_per_node_bytes=int(cpu),
                cpu_per_node_gib=round(cpu / GIB, 2), nvme_per_node_bytes=int(disk * per_node),
                fits_gpu=fits_gpu, fits_cpu=fits_cpu, fits=fits_gpu and fits_cpu and not refused, note=note)


def plan(args) -> dict:
    config = resolve_model(args.model)
    total, layer, embeddings = count_params(config)
    # LoRA: rank-r A (r x in) and B (out x r) for q_proj and v_proj (hidden x hidden) in every layer.
    trained = 4 * args.lora * config["hidden_size"] * config["num_hidden_layers"] if args.lora else total
    act = activations(config, args.micro_batch, args.seq_len, args.gradient_checkpointing)
    strategies = sorted((s for s in map(read_strategy, sorted(CONFIGS.glob("*.yaml"))) if s), key=Strategy.order)
    rows = [estimate(s, trained, total if args.lora else 0, max(layer, embeddings), act, args) for s in strategies]
    many = args.num_gpus * args.num_nodes > 1
    recommended = next((r["config"] for r in rows if r["fits"] and not (many and r["strategy"] == "single")), None)
    advice = [t for t, used in (("--lora 8", args.lora), ("--optim adamw_8bit", args.optim != "adamw"),
                                ("--gradient-checkpointing", args.gradient_checkpointing)) if not used]
    advice += ["a smaller --micro-batch or --seq-len", "more --num-gpus or --num-nodes"]
    cpu_bound = [r for r in rows if r["fits_gpu"] and not r["fits_cpu"] and not r["note"]]
    if cpu_bound:  # the GPUs would do: say how much CPU memory the least hungry of those needs
        r = min(cpu_bound, key=lambda r: r["cpu_per_node_bytes"])
        advice.insert(0, f"--cpu-memory {r['cpu_per_node_bytes'] / (1 - HEADROOM) / GIB:.0f} or more ({r['config']})")
    return dict(model=args.model, params=total, trained_params=trained, optim=args.optim, lora_r=args.lora,
                micro_batch=args.micro_batch, seq_len=args.seq_len, num_gpus=args.num_gpus, num_nodes=args.num_nodes,
                gpu_memory_gib=args.gpu_memory, cpu_memory_gib=args.cpu_memory, headroom=HEADROOM, rows=rows,
                recommended=recommended, advice=[] if recommended else advice)


def print_table(p: dict) -> None:
    trained = "all trained" if p["trained_params"] == p["params"] else f"{p['trained_params'] / 1e6:.2f}M trained (LoRA)"
    print(f"{p['model']}: {p['params'] / 1e9:.3f}B parameters ({p['params']:,}), {trained}, {p['optim']}, "
          f"micro-batch {p['micro_batch']} x seq {p['seq_len']}")
    print(f"{p['num_gpus']} GPU(s) x {p['gpu_memory_gib']:g} GiB on {p['num_nodes']} node(s), "
          f"{p['cpu_memory_gib']:.0f} GiB CPU per node; fits: at most {1 - HEADROOM:.0%} of each. In GiB:")
    head = ("config", "GPU states", "buffers", "activations", "GPU total", "CPU/node", "NVMe/node", "fits")
    print(f"{head[0]:<20}" + "".join(f"{h:>12}" for h in head[1:-1]) + f"  {head[-1]}")
    for r in p["rows"]:
        numbers = (r["gpu_model_states_bytes"], r["gpu_buffers_bytes"], r["gpu_activations_bytes"],
                   r["gpu_total_bytes"], r["cpu_per_node_bytes"], r["nvme_per_node_bytes"])
        fits = ("yes" if r["fits"] else "no") + (f" ({r['note']})" if r["note"] else "")
        print(f"{r['config']:<20}" + "".join(f"{n / GIB:>12.1f}" for n in numbers) + f"  {fits}")
    if p["recommended"]:
        print(f"recommended: {p['recommended']} (accelerate_configs/{p['recommended']}.yaml)")
    else:
        print(f"nothing fits: try {', '.join(p['advice'])}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="toolkit.plan", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="hub id, local HF directory, or an OPT size (1.3b, opt-13b)")
    parser.add_argument("--num-gpus", type=int, default=1, help="GPUs per node")
    parser.add_argument("--gpu-memory", type=float, required=True, help="GiB per GPU")
    parser.add_argument("--num-nodes", type=int, default=1)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    parser.add_argument("--cpu-memory", type=float, default=ram, help="GiB per node (default: this machine's)")
    parser.add_argument("--lora", type=int, default=0, metavar="R", help="LoRA rank on q_proj,v_proj (0: full)")
    parser.add_argument("--optim", choices=("adamw", "adamw_8bit"), default="adamw")
    parser.add_argument("--micro-batch", type=int, default=8, help="sequences per GPU (train.micro_batch_size)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (data.block_size)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="model.gradient_checkpointing=true")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args(argv)
    for name in ("num_gpus", "num_nodes", "micro_batch", "seq_len", "gpu_memory", "cpu_memory"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}: pass a positive value")
    if args.lora < 0:
        raise UserError(f"--lora must be a LoRA rank >= 1 (or 0 for full fine-tuning), got {args.lora}")
    result = plan(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)


if __name__ == "__main__":
    run_cli(main)
