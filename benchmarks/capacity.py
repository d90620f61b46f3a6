"""Capacity: the largest OPT shape each strategy trains on this machine, and what each rank holds.

    python benchmarks/capacity.py --json benchmarks/capacity.json --results benchmarks/RESULTS.md

For each strategy, shapes are tried from the smallest up (random-opt-125m, 350m, 1.3b, 2.7b,
6.7b) until one fails: 2 optimizer steps, 2 processes, micro batch 1 x 128 tokens, fp32 AdamW
(or 8-bit AdamW where named). Each candidate is its own `accelerate launch`, watched from here:
when the processes' memory together (proportional set size) passes --memory-limit-gb (or a time limit passes),
the candidate is killed and recorded as failed, so an out-of-memory run ends the candidate, not
the machine. Each rank's peak resident memory at start (building, then `prepare`) and in
training comes from the run's own records (config.yaml runtime, summary.json), and is set
against the ZeRO formula: 16 bytes per parameter (4 weight + 4 gradient + 8 Adam moments in
fp32, as 2 + 2 + 12 in mixed precision) split as the strategy splits it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
SHAPES = ["random-opt-125m", "random-opt-350m", "random-opt-1.3b", "random-opt-2.7b", "random-opt-6.7b"]
PROCESSES = 2


class Candidate(NamedTuple):
    config: str  # accelerate config
    overrides: list
    bytes_per_param: float  # model states held in memory by each rank (the ZeRO formula)
    mixed_precision: str = "no"
    processes: int = PROCESSES


# Offload to "CPU" is no saving on a machine whose device is the CPU.
CANDIDATES = {
    "ddp": Candidate("ddp", [], 16),
    "fsdp": Candidate("fsdp", [], 16 / 2),
    "zero3": Candidate("zero3", [], 16 / 2),
    "zero3 + adamw_8bit": Candidate("zero3", ["optim.name=adamw_8bit"], (4 + 4 + 2) / 2),
    "zero3_offload": Candidate("zero3_offload", [], 16 / 2),
    "fsdp_shard_grad_op": Candidate("fsdp_shard_grad_op", [], 16 / 2),
    "fsdp_offload": Candidate("fsdp_offload", [], 16 / 2),
    "zero1": Candidate("zero1", [], 4 + 4 + 8 / 2),  # weights and gradients whole, Adam sharded
    "zero2": Candidate("zero2", [], 4 + 12 / 2),
    "zero2_offload": Candidate("zero2_offload", [], 4 + 12 / 2),
    "zero3_nvme": Candidate("zero3_nvme", [], 4 / 2),  # fp32 gradients in memory; weights and Adam on disk
    # random-opt-2.7b: one bf16 process, whose gradient partition is bf16 (DeepSpeed accumulates in
    # the model's dtype) and pinned in memory; weights, masters, moments and fp32 gradients on disk.
    "zero3_nvme, bf16, 1 process": Candidate("zero3_nvme", [], 2, "bf16", 1),
}


def prepare(work: Path) -> tuple[Path, Path]:
    """Training text and its tokenizer (trained once: every candidate copies it)."""
    from toolkit.demo_data import stdlib_docs
    from toolkit.model import PRESETS, train_bpe_tokenizer

    docs = [d for _, d in zip(range(1000), stdlib_docs())]
    text = work / "text.jsonl"
    text.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tokenizer = work / "tokenizer"
    train_bpe_tokenizer((d["text"] for d in docs), PRESETS[SHAPES[0]]["vocab_size"]).save_pretrained(tokenizer)
    return text, tokenizer


def run_args(shape: str, text: Path, out: Path, extra: list[str]) -> list[str]:
    """The run every candidate makes: 2 optimizer steps of micro batch 1 x 128 tokens, the
    held-out loss at the end on one batch."""
    return [f"model.name_or_path={shape}", f"data.train={text}", "data.block_size=128", "data.eval_fraction=0.01",
            "train.micro_batch_size=1", "train.max_steps=2", "train.seed=1", "optim.scheduler=constant",
            "optim.warmup_steps=0", "eval.every=0", "eval.max_batches=1", "eval.micro_batch_size=1",
            "train.report_to=none", f"output_dir={out}", *extra]


def launch_command(config: str, processes: int, mixed_precision: str, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "accelerate_configs" / f"{config}.yaml"), "--num_processes", str(processes),
            "--mixed_precision", mixed_precision, "-m", "toolkit.train", *args]


def launch_env() -> dict:
    return dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                PYTHONPATH=str(ROOT))


def run_candidate(name: str, shape: str, work: Path, text: Path, tokenizer: Path, limit_gb: float,
                  timeout_s: float) -> dict:
    candidate = CANDIDATES[name]
    out = work / f"{name.replace(' + ', '-').replace(', ', '-').replace(' ', '-')}-{shape}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    shutil.copytree(tokenizer, out / "tokenizer")
    cmd = launch_command(candidate.config, candidate.processes, candidate.mixed_precision,
                         run_args(shape, text, out, ["checkpoint.every=0", *candidate.overrides]))
    started = time.time()
    with (out / "launch.log").open("w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=launch_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        watch = Watchdog(proc, limit_gb, timeout_s)
        returncode = proc.wait()
        watch.stop()
    result = {"strategy": name, "shape": shape, "seconds": round(time.time() - started),
              "max_total_gb": round(watch.max_total_gb, 2)}
    failed = watch.verdict or (f"exit {returncode}: " + " | ".join(
        (out / "launch.log").read_text(errors="replace").strip().splitlines()[-3:])[-300:] if returncode else None)
    # summary.json is written when the steps are done, before final/ is exported: a candidate that
    # fails after it trained, with the export noted.
    if failed and not (out / "summary.json").exists():
        return {**result, "trains": False, "why": failed}
    if failed:
        result["export"] = f"failed: {failed}"
    import yaml

    runtime = yaml.safe_load((out / "config.yaml").read_text())["runtime"]
    summary = json.loads((out / "summary.json").read_text())
    start = runtime["memory_at_start_gb"]
    params = runtime["params_numel"]
    if (out / "nvme_offload").is_dir():
        result["nvme_gb"] = round(disk_bytes(out / "nvme_offload") / 1e9, 2)
    shutil.rmtree(out, ignore_errors=True)  # checkpoints and swap files of big models fill the disk
    return {**result, "trains": True, "params": params, "processes": candidate.processes,
            "mixed_precision": candidate.mixed_precision,
            "start_peak_gb": [max(a, b) for a, b in zip(start["model_built"], start["prepared"])],
            "before_model_gb": start["before_model"], "model_built_gb": start["model_built"],
            "training_peak_gb": summary["peak_mem_gb_per_rank"],
            "export_peak_gb": summary.get("export_peak_mem_gb_per_rank"),
            "formula_gb": round(params * candidate.bytes_per_param / 2**30, 2)}


def disk_bytes(folder: Path) -> int:
    """Bytes a folder holds on disk (DeepSpeed's swap files are written whole, not sparse)."""
    return sum(f.stat().st_blocks * 512 for f in folder.rglob("*") if f.is_file())


class Watchdog:
    """Kills the candidate's process group when its resident memory or its time passes the limit."""

    def __init__(self, proc: subprocess.Popen, limit_gb: float, timeout_s: float):
        self.proc, self.limit, self.deadline = proc, limit_gb, time.time() + timeout_s
        self.verdict, self.max_total_gb, self.done = None, 0.0, threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while not self.done.wait(0.2):
            try:
                procs = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
                # proportional set size: pages shared between the ranks (libraries, shared-memory
                # communication buffers) counted once, as the machine holds them
                total = sum(p.memory_full_info().pss for p in procs) / 2**30
            except psutil.Error:
                continue
            self.max_total_gb = max(self.max_total_gb, total)
            if total > self.limit or time.time() > self.deadline:
                self.verdict = (f"out of memory: {total:.1f} GB held > limit {self.limit} GB" if total > self.limit
                                else "time limit")
                os.killpg(self.proc.pid, signal.SIGKILL)
                return

    def stop(self) -> None:
        self.done.set()


def capacity(names: list[str], shapes: list[str], work: Path, limit_gb: float, timeout_s: float):
    """Yields each candidate's row as it ends: per strategy, shapes ascending until one fails."""
    text, tokenizer = prepare(work)
    for name in names:
        for shape in shapes:
            row = run_candidate(name, shape, work, text, tokenizer, limit_gb, timeout_s)
            print(json.dumps(row), flush=True)
            yield row
            if not row["trains"]:
                break


def table(rows: list[dict]) -> str:
    lines = ["| strategy | shape | trains | params | formula GB/rank | peak at start GB (rank 0, 1) | "
             "peak in training GB (rank 0, 1) | peak in export GB (rank 0, 1) | NVMe swap GB | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["trains"]:
            trains = f"yes; export {r['export']}" if "export" in r else "yes"
            export = ", ".join(f"{v:.2f}" for v in r["export_peak_gb"]) if r.get("export_peak_gb") else "not measured"
            lines.append(f"| {r['strategy']} | {r['shape']} | {trains} | {r['params'] / 1e6:,.0f}M | {r['formula_gb']} | "
                         f"{', '.join(f'{v:.2f}' for v in r['start_peak_gb'])} | "
                         f"{', '.join(f'{v:.2f}' for v in r['training_peak_gb'])} | {export} | "
                         f"{r.get('nvme_gb', '')} | {r['seconds']} |")
        else:
            lines.append(f"| {r['strategy']} | {r['shape']} | **no**: {r['why']} | | | | | | | {r['seconds']} |")
    return "\n".join(lines)


def largest(rows: list[dict]) -> dict:
    best = {}
    for r in rows:
        if r["trains"]:
            best[r["strategy"]] = r["shape"]
    return best


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", nargs="*", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--shapes", nargs="*", default=SHAPES, choices=SHAPES)
    parser.add_argument("--memory-limit-gb", type=float,
                        default=round(psutil.virtual_memory().total / 2**30 * 0.92, 1))
    parser.add_argument("--timeout-min", type=float, default=40, help="per candidate")
    parser.add_argument("--work", type=Path, help="scratch directory, also for the NVMe swap files "
                                                   "(default: a temporary one)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--update", action="store_true",
                        help="keep the rows of --json that this run does not measure again (same strategy and shape)")
    parser.add_argument("--results", type=Path, help="markdown file whose capacity section is rewritten")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="toolkit-capacity-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    from report import write_capacity_section
    from run import machine

    rows = json.loads(args.json.read_text())["rows"] if args.update else []
    commands = [*(json.loads(args.json.read_text()).get("commands", []) if args.update else []),
                shlex.join(["python", *sys.argv])]
    # The report is rewritten after every candidate: a run stopped early keeps what it measured.
    for row in capacity(args.strategies, args.shapes, work, args.memory_limit_gb, args.timeout_min * 60):
        at = [i for i, r in enumerate(rows) if (r["strategy"], r["shape"]) == (row["strategy"], row["shape"])]
        if at:
            rows[at[0]] = row
        else:
            rows.append(row)
        result = {"rows": rows, "largest": largest(rows), "memory_limit_gb": args.memory_limit_gb,
                  "machine": f"{machine()}, {psutil.virtual_memory().total / 2**30:.0f} GiB",
                  "seconds": round(time.time() - started),
                  "command": commands[-1], "commands": commands}
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        if args.results:
            write_capacity_section(result, table(rows), args.results)
    print(table(rows))


if __name__ == "__main__":
    main()
