"""Scaling: tokens/s of each strategy at 1, 2 and 4 processes, and each step split into compute and
communication, from the profiler.

    python benchmarks/scaling.py --quick      # tiny-opt at 1 and 2 processes, about 4 minutes on 2 cores
    python benchmarks/scaling.py --json benchmarks/scaling.json --results benchmarks/RESULTS.md   # full

Weak scaling: every process keeps the same micro batch (tiny-opt 8 x 128 tokens, random-opt-125m
4 x 128), so N processes train N times the tokens of one per step, and the efficiency is tokens/s at
N over tokens/s of one process (`single`). Each point is one `accelerate launch` of the toolkit in
fp32 with `--num_processes N` and the strategy's config (ddp, zero2, zero3, fsdp), 6 optimizer steps:
1-2 warm up, 3-4 are recorded by `train.profile_steps`, 5-6 are timed (the toolkit's own tokens_per_s,
the time inside optimizer steps, without the profiler). From the recorded steps of every rank's
trace: communication is the time within the step when any collective (gloo:* / nccl:* events, on any
thread) is in flight, overlapping ones counted once; compute is the rest of the step. The bytes each
rank sends per step are the run's `comm_bytes` (toolkit/comm.py).

On a machine with fewer cores than processes the processes share them (`accelerate launch` gives each
process cores / processes threads, at least one): the times then say what the strategy costs on these
cores, and the bytes per step are what carries over to a cluster.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
from run import Bench, machine, whole_run_args  # noqa: E402  (the launcher every benchmark shares)

MODES = {
    "quick": dict(shapes={"tiny-opt": 8}, processes=(1, 2)),
    "full": dict(shapes={"tiny-opt": 8, "random-opt-125m": 4}, processes=(1, 2, 4)),
}
STRATEGIES = ("ddp", "zero2", "zero3", "fsdp")
WARMUP, PROFILED, TIMED = 2, 2, 2  # optimizer steps, in this order
# Where a collective is in flight: gloo runs each on a worker thread under a "gloo:<op>" span; NCCL's
# kernels on the GPU stream.
COLLECTIVE = re.compile(r"^(gloo|nccl):|^nccl(Dev)?Kernel")


def prepare(work: Path, shape: str) -> tuple[Path, Path]:
    """Training text and a tokenizer of the shape's vocabulary, trained once for every point."""
    from toolkit.demo_data import stdlib_docs
    from toolkit.model import PRESETS, train_bpe_tokenizer

    text = work / "text.jsonl"
    if not text.exists():
        text.write_text("".join(json.dumps(d) + "\n" for _, d in zip(range(3000), stdlib_docs())))
    tokenizer = work / f"tokenizer-{shape}"
    docs = (json.loads(line)["text"] for line in text.read_text().splitlines())
    train_bpe_tokenizer(docs, PRESETS[shape]["vocab_size"]).save_pretrained(tokenizer)
    return text, tokenizer


def point(bench: Bench, shape: str, micro_batch: int, strategy: str, processes: int, text: Path,
          tokenizer: Path) -> dict:
    """One launch: throughput, bytes and the compute / communication split of one (shape, strategy, N)."""
    out = bench.work / f"{shape}-{strategy}-{processes}"
    args = {"model.name_or_path": shape, "data.train": text, "data.block_size": 128, "data.eval_fraction": 0.01,
            "train.micro_batch_size": micro_batch, "train.max_steps": WARMUP + PROFILED + TIMED,
            "train.profile_steps": PROFILED, "train.seed": 42, "optim.scheduler": "constant",
            "eval.max_batches": 1, "train.report_to": "none", "output_dir": out}
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(tokenizer, out / "tokenizer")  # the toolkit reuses a preset's tokenizer found there
    bench.launch(strategy, ["-m", "toolkit.train", *(f"{k}={v}" for k, v in args.items())], processes,
                 f"{shape}-{strategy}-{processes}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "loss" in r and r["step"] > WARMUP + PROFILED]
    seconds = sum(r["input_tokens"] / r["tokens_per_s"] for r in timed)
    steps = [split for rank in range(processes) for split in step_split(out / "profile" / f"rank{rank}.json")]
    step_s = statistics.mean(s["step_s"] for s in steps)
    comm_s = statistics.mean(s["comm_s"] for s in steps)
    return {"shape": shape, "strategy": strategy if processes > 1 else "single", "processes": processes,
            "tokens_per_s": sum(r["input_tokens"] for r in timed) / seconds, "step_s": step_s, "comm_s": comm_s,
            "compute_s": step_s - comm_s, "comm_share": comm_s / step_s,
            "comm_bytes_per_rank": statistics.mean(r["comm_bytes"] for r in timed)}


def step_split(trace: Path) -> list[dict]:
    """Each recorded step of one rank's Chrome trace: its length, and the time within it when at
    least one collective was in flight (the union of their spans, so overlapping ones count once)."""
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("ph") == "X"]
    steps = [e for e in events if e["name"].startswith("ProfilerStep#")]
    collectives = [(e["ts"], e["ts"] + e["dur"]) for e in events if COLLECTIVE.search(e["name"])]
    if not steps:
        raise SystemExit(f"{trace} holds no ProfilerStep: was train.profile_steps set?")
    return [{"step_s": s["dur"] / 1e6, "comm_s": covered(collectives, s["ts"], s["ts"] + s["dur"]) / 1e6}
            for s in steps]


def covered(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """Length of the union of `intervals`, clipped to [start, end]."""
    total, reached = 0.0, start
    for a, b in sorted(intervals):
        a, b = max(a, reached), min(b, end)
        if b > a:
            total += b - a
            reached = b
    return total


def run(mode: str, work: Path) -> list[dict]:
    bench = Bench("quick", work)  # only its launcher: same threads per process as every benchmark
    rows = []
    for shape, micro_batch in MODES[mode]["shapes"].items():
        text, tokenizer = prepare(work, shape)
        for processes in MODES[mode]["processes"]:
            for strategy in (("single",) if processes == 1 else STRATEGIES):
                rows.append(point(bench, shape, micro_batch, strategy, processes, text, tokenizer))
                print(json.dumps(rows[-1]), flush=True)
    for row in rows:  # efficiency against one process of the same shape
        single = next(r for r in rows if r["shape"] == row["shape"] and r["processes"] == 1)
        row["efficiency"] = row["tokens_per_s"] / single["tokens_per_s"]
    return rows


def main(argv=None) -> None:
    args, mode, work = whole_run_args(argv, __doc__.splitlines()[0], "tiny-opt at 1 and 2 processes only", "scaling",
                                      "toolkit-scaling-")
    started = time.time()
    rows = run(mode, work)
    result = {"mode": mode, "rows": rows, "machine": machine(), "seconds": round(time.time() - started),
              "command": " ".join([Path(sys.executable).name, *sys.argv])}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.results:
        from report import write_scaling_section
        write_scaling_section(result, args.results)
    from report import scaling_table
    print(scaling_table(rows))


if __name__ == "__main__":
    main()
