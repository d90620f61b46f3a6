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
        lines += ["", "What each strategy costs: tokens/s of every accelerate config, 2 processes, relative to DDP:", "",
                  "| config | tokens/s | vs ddp |", "|---|---|---|"]
        lines += [f"| {c} | {s['tokens_per_s']:.1f} | {s['vs_ddp']:.3f} |" for c, s in d["strategies"].items()]
    for key in ("checkpoint", "preprocessing", "activation_checkpointing"):
        if key in d:
            lines += ["", f"- {key}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                 for k, v in d[key].items())]
    lines.append(END)
    section = "\n".join(lines)
    text = results_md.read_text() if results_md.exists() else "# Benchmarks\n"
    if BEGIN in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: section, text, flags=re.S)
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
