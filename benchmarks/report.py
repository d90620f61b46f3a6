"""Write run.py's results into RESULTS.md (between the speed markers) with PNG charts beside it."""

from __future__ import annotations

import re
from pathlib import Path

BEGIN, END = "<!-- speed:begin (benchmarks/run.py writes this section) -->", "<!-- speed:end -->"


def write_speed_section(r: dict, results_md: Path) -> None:
    d = r["detail"]
    charts = results_md.parent
    throughput_chart(d["throughput"], charts / "throughput.png")
    lines = [BEGIN, "## Speed against peers", "",
             f"`{r['command']}` ({r['mode']} mode, {r['seconds'] // 60} min), on {r['machine']}.", "",
             "| key | measured | goal |", "|---|---|---|"]
    goals = {"throughput_vs_reference": ">= 1.0", "throughput_vs_trainer": ">= 1.15", "mfu_vs_matmul_peak": ">= 0.6",
             "packing_useful_tokens_speedup": ">= 1.5", "zero3_state_memory_vs_ddp": "<= 0.55",
             "adam8bit_state_vs_adamw": "<= 0.27"}
    lines += [f"| `{k}` | {r[k]:.3f} | {g} |" for k, g in goals.items()]
    lines += ["", "Training tokens/s, random-opt-125m, block 128, fp32, the same global batch at 1 and 2 processes "
              "(2 processes share the 2 cores, one thread each):", "",
              "| processes | toolkit | reference loop | Trainer | toolkit / reference | toolkit / Trainer |",
              "|---|---|---|---|---|---|"]
    for n, t in d["throughput"].items():
        s = t["tokens_per_s"]
        lines.append(f"| {n} | {s['toolkit']:.1f} | {s['reference']:.1f} | {s['trainer']:.1f} | "
                     f"{t['vs_reference']:.3f} | {t['vs_trainer']:.3f} |")
    one, two = (d["throughput"][k]["tokens_per_s"] for k in sorted(d["throughput"]))
    lines += ["", "![throughput](throughput.png)", "",
              f"Scaling from 1 to 2 processes on 2 cores (toolkit): {two['toolkit'] / one['toolkit']:.2f}x "
              "(the same cores split two ways: this measures the cost of the gradient all-reduce, not a speed-up).",
              "", f"- MFU: {d['mfu']['achieved_tflops'] * 1e3:.1f} GFLOP/s of model FLOPs over a best fp32 matmul of "
              f"{d['mfu']['matmul_peak_tflops'] * 1e3:.1f} GFLOP/s measured in the same run = **{d['mfu']['ratio']:.3f}**.",
              f"- Packed SFT rows: {d['packing']['tokens_per_s']['true']:.1f} non-pad tokens/s against "
              f"{d['packing']['tokens_per_s']['false']:.1f} padded (**{d['packing']['ratio']:.2f}x**).",
              f"- Model states per rank (resident memory, 2 ranks): ddp {d['state_memory']['bytes_per_rank']['ddp'] / 2**30:.2f} "
              f"GiB, zero3 {d['state_memory']['bytes_per_rank']['zero3'] / 2**30:.2f} GiB (**{d['state_memory']['ratio']:.3f}**).",
              f"- Optimizer state: AdamW {d['adam8bit']['bytes']['adamw'] / 2**20:.1f} MiB, 8-bit "
              f"{d['adam8bit']['bytes']['adamw_8bit'] / 2**20:.1f} MiB (**{d['adam8bit']['ratio']:.3f}**)."]
    if "strategies" in d:
        lines += ["", "What each strategy costs: tokens/s of every accelerate config against DDP on as many processes "
                  "(2, or the 4 that hsdp's 2 x 2 mesh needs, then sharing 2 cores four ways), the two taking turns "
                  "step by step; vs ddp is the median over the pairs of adjacent steps"
                  + " (" + ", then ".join(f"`{r['command']}`, {r['minutes']} min" for r in d.get("strategies_runs", []))
                  + "):", "",
                  "| config | processes | tokens/s | ddp tokens/s in the same turns | vs ddp | MB/rank/step |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {c} | {s['processes']} | {s['tokens_per_s']:.1f} | {s['ddp_tokens_per_s']:.1f} | "
                  f"{s['vs_ddp']:.3f} | {s['mb_per_rank_step']:.1f} |" for c, s in sorted(d["strategies"].items())]
    for key in ("checkpoint", "preprocessing", "activation_checkpointing"):
        if key in d:
            lines += ["", f"- {key}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                 for k, v in d[key].items())]
    lines.append(END)
    replace_section(results_md, BEGIN, END, "\n".join(lines))


def write_capacity_section(r: dict, table: str, results_md: Path) -> None:
    begin, end = "<!-- capacity:begin (benchmarks/capacity.py writes this section) -->", "<!-- capacity:end -->"
    largest = ", ".join(f"{name} {shape.removeprefix('random-opt-')}" for name, shape in r["largest"].items())
    lines = [begin, "## Capacity: the largest model each strategy trains here", "",
             ", then ".join(f"`{c}`" for c in r.get("commands", [r["command"]]))
             + f" (the last {r['seconds'] // 60} min), on {r['machine']}; each candidate killed above "
             f"{r['memory_limit_gb']} GB resident (all its processes together). 2 processes, micro batch 1 x 128, "
             "2 optimizer steps, fp32, unless the strategy's name says otherwise. Peaks are each rank's resident memory (VmHWM): at start = while the model "
             "is built and `prepare`d, in training = from the first step on, in export = while `final/` is written "
             "(a rank's training memory is still held then). The formula is the model states a "
             "rank holds by the ZeRO accounting (16 bytes per parameter, split as the strategy splits them); the "
             "rest is the process itself (about 0.5 GB of libraries), activations, gathered layers and buffers.", "",
             f"Largest that trains: {largest}.", "", *against_ddp(r["rows"]), *export_over_training(r["rows"]), table,
             end]
    replace_section(results_md, begin, end, "\n".join(lines))


def export_over_training(rows: list[dict]) -> list[str]:
    """How far writing final/ goes above training, per rank: the streaming export's bound is one
    safetensors shard (checkpoint.max_shard_size, 2 GB by default)."""
    over = [(e - t, r["strategy"], r["shape"]) for r in rows if r["trains"] and r.get("export_peak_gb")
            for e, t in zip(r["export_peak_gb"], r["training_peak_gb"])]
    if not over:
        return []
    gb, strategy, shape = max(over)
    bound = "within one 2 GB shard (checkpoint.max_shard_size) for every row" if gb <= 2 else \
        "**more than one 2 GB shard** (checkpoint.max_shard_size)"
    return [f"Export against training, per rank: at most {gb:+.2f} GB ({strategy}, {shape}), {bound}.", ""]


def write_scaling_section(r: dict, results_md: Path) -> None:
    begin, end = "<!-- scaling:begin (benchmarks/scaling.py writes this section) -->", "<!-- scaling:end -->"
    scaling_chart(r["rows"], results_md.parent / "scaling.png")
    lines = [begin, "## Scaling: 1, 2 and 4 processes, compute against communication", "",
             f"`{r['command']}` ({r['mode']} mode, {r['seconds'] // 60} min), on {r['machine']}. Weak scaling: "
             "each process keeps its micro batch (tiny-opt 8 x 128 tokens, random-opt-125m 4 x 128), fp32; "
             "efficiency = tokens/s over one process's. step s, comm s: the mean recorded step (every rank, "
             "2 steps after 2 of warm-up) and the time within it when a collective was in flight; MB/rank/step: "
             "what each rank sent (`comm_bytes`). **All process counts share the same cores**: 4 processes "
             "oversubscribe 2 cores, so the times show what each strategy costs here, and the bytes per step "
             "are what carries over to a cluster.", "", scaling_table(r["rows"]), "", "![scaling](scaling.png)", end]
    replace_section(results_md, begin, end, "\n".join(lines))


def scaling_table(rows: list[dict]) -> str:
    lines = ["| shape | strategy | processes | tokens/s | efficiency | step s | comm s | comm share | MB/rank/step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['strategy']} | {r['processes']} | "
                     f"{r['tokens_per_s']:.1f} | {r.get('efficiency', float('nan')):.2f} | {r['step_s']:.2f} | "
                     f"{r['comm_s']:.2f} | {r['comm_share']:.0%} | {r['comm_bytes_per_rank'] / 1e6:.1f} |")
    return "\n".join(lines)


def scaling_chart(rows: list[dict], path: Path) -> None:
    """Per shape: tokens/s against processes, one line per strategy (1 process: `single`, shared)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 3.4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        mine = [r for r in rows if r["shape"] == shape]
        single = [r for r in mine if r["processes"] == 1]
        for strategy in dict.fromkeys(r["strategy"] for r in mine if r["processes"] > 1):
            line = single + [r for r in mine if r["strategy"] == strategy]
            ax.plot([r["processes"] for r in line], [r["tokens_per_s"] for r in line], "o-", label=strategy)
        ax.set_xticks(sorted({r["processes"] for r in mine}))
        ax.set_xlabel("processes (all on this machine)")
        ax.set_ylabel("training tokens/s")
        ax.set_title(f"{shape}, fp32, weak scaling")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def against_ddp(rows: list[dict], shape: str = "random-opt-350m") -> list[str]:
    """One line: each strategy's larger-rank peaks at `shape` over DDP's, at start and in training."""
    peaks = {r["strategy"]: (max(r["start_peak_gb"]), max(r["training_peak_gb"]))
             for r in rows if r["trains"] and r["shape"] == shape}
    if "ddp" not in peaks:
        return []
    ratios = [f"{name} {start / peaks['ddp'][0]:.2f}x / {training / peaks['ddp'][1]:.2f}x"
              for name, (start, training) in peaks.items() if name != "ddp"]
    return [f"Per-rank peak against ddp at {shape} (at start / in training): {', '.join(ratios)}.", ""]


def replace_section(results_md: Path, begin: str, end: str, section: str) -> None:
    """Rewrite the text between the markers, or append the section."""
    text = results_md.read_text() if results_md.exists() else "# Benchmarks\n"
    if begin in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    results_md.write_text(text)


def throughput_chart(throughput: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    programs = ("toolkit", "reference", "trainer")
    fig, ax = plt.subplots(figsize=(6, 3.2))
    width = 0.25
    for i, program in enumerate(programs):
        xs = [j + (i - 1) * width for j in range(len(throughput))]
        ax.bar(xs, [t["tokens_per_s"][program] for t in throughput.values()], width, label=program)
    ax.set_xticks(range(len(throughput)), [f"{n} process{'es' if int(n) > 1 else ''}" for n in throughput])
    ax.set_ylabel("training tokens/s")
    ax.set_title("random-opt-125m, fp32, same job")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
