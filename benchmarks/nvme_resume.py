"""zero3_nvme at a size that swaps: train, stop, export the checkpoint, resume; against an uninterrupted run.

    python benchmarks/nvme_resume.py --shape random-opt-1.3b --processes 2 --mixed-precision no \
        --json benchmarks/nvme_resume.json

Four launches of the same run (2 optimizer steps, micro batch 1 x 128 tokens, held-out loss at the
end), each watched as capacity.py watches its candidates:
  uninterrupted  trains both steps and exports final/;
  stopped        gets SIGTERM during step 1, as a preempted job does: checkpoint at step 1, exit;
  export         `toolkit.export` of that checkpoint (weights read from its NVMe swap files);
  resumed        `resume=auto`: step 2 from the checkpoint, then final/.
The resumed run's step-2 loss and held-out loss must equal the uninterrupted run's to the
tolerance of the strategy tests (relative 1e-5): Adam's moments came back from disk.

Disk: an NVMe run keeps swap files of 18 bytes per parameter in bf16 (weights, fp32 master,
moments and gradients; 20 in fp32) and a checkpoint copies the optimizer's files (12 bytes). Each
launch's swap folder is deleted once it has ended (a resume rebuilds it from the checkpoint), the
checkpoint once the resumed run has read it (its step 2 is logged), and sizes are recorded first.
At random-opt-2.7b in bf16 the stopped run holds 48 + 32 GB at once (measured, 2 processes:
benchmarks/nvme_resume_2.7b.json, 34 min, with 86 GB free after `apt-get clean`).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
from capacity import Watchdog, disk_bytes, launch_command, launch_env, prepare, run_args  # noqa: E402

LOSS_RTOL = 1e-5  # tests/test_strategies.py: resume against an uninterrupted run, every config


def launch(args, out: Path, text: Path, tokenizer: Path, extra: list[str], watch=None) -> dict:
    """One `accelerate launch` of the run into `out`; `watch(proc, out)` is called every second."""
    if not (out / "tokenizer").exists():  # the run's tokenizer, trained once (capacity.prepare)
        shutil.copytree(tokenizer, out / "tokenizer")
    cmd = launch_command("zero3_nvme", args.processes, args.mixed_precision, run_args(
        args.shape, text, out, ["train.stop_check_every=1", "checkpoint.export_dtype=bf16", *extra]))
    return watched(cmd, out / "launch.log", args, lambda proc: watch and watch(proc, out))


def watched(cmd: list[str], log_path: Path, args, every_second) -> dict:
    started = time.time()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=launch_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        dog = Watchdog(proc, args.memory_limit_gb, args.timeout_min * 60)
        while proc.poll() is None:
            every_second(proc)
            time.sleep(1)
        dog.stop()
    if proc.returncode or dog.verdict:
        tail = " | ".join(log_path.read_text(errors="replace").strip().splitlines()[-3:])[-400:]
        raise SystemExit(f"{shlex.join(cmd)} failed ({dog.verdict or f'exit {proc.returncode}'}): {tail}")
    return {"seconds": round(time.time() - started), "max_total_gb": round(dog.max_total_gb, 2)}


def metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def losses(out: Path) -> dict:
    records = metrics(out)
    return {"step_losses": {r["step"]: r["loss"] for r in records if "loss" in r and "eval_loss" not in r},
            "eval_loss": next(r["eval_loss"] for r in reversed(records) if "eval_loss" in r)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="random-opt-1.3b")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--mixed-precision", default="no", choices=("no", "bf16"))
    parser.add_argument("--memory-limit-gb", type=float, default=round(psutil.virtual_memory().total / 2**30 * 0.92, 1))
    parser.add_argument("--timeout-min", type=float, default=60, help="per launch")
    parser.add_argument("--work", type=Path, help="scratch directory, also for the swap files (default: a temporary one)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="toolkit-nvme-"))
    work.mkdir(parents=True, exist_ok=True)
    text, tokenizer = prepare(work)
    result = {"shape": args.shape, "processes": args.processes, "mixed_precision": args.mixed_precision,
              "command": shlex.join(["python", *sys.argv])}

    # 1. uninterrupted
    out = work / "uninterrupted"
    shutil.rmtree(out, ignore_errors=True)
    run = launch(args, out, text, tokenizer, [])
    summary = json.loads((out / "summary.json").read_text())
    result["uninterrupted"] = {**run, **losses(out), "nvme_gb": round(disk_bytes(out / "nvme_offload") / 1e9, 2),
                               "training_peak_gb": summary["peak_mem_gb_per_rank"],
                               "export_peak_gb": summary["export_peak_mem_gb_per_rank"],
                               "final_gb": round(disk_bytes(out / "final") / 1e9, 2)}
    shutil.rmtree(out)
    print(json.dumps(result["uninterrupted"]), flush=True)

    # 2. stopped by SIGTERM during step 1: checkpoint at step 1, no final/
    out = work / "resumed"
    shutil.rmtree(out, ignore_errors=True)

    def stop_in_step_one(proc, out):
        if "train:" in (out / "launch.log").read_text(errors="replace") and not getattr(proc, "signalled", False):
            for worker in psutil.Process(proc.pid).children(recursive=True):
                if "toolkit.train" in " ".join(worker.cmdline()):
                    worker.send_signal(signal.SIGTERM)
            proc.signalled = True

    run = launch(args, out, text, tokenizer, [], watch=stop_in_step_one)
    (step_dir,) = (out / "checkpoints").iterdir()
    assert not (out / "final").exists() and step_dir.name == "step-000001", step_dir
    result["stopped"] = {**run, "checkpoint": step_dir.name, "checkpoint_gb": round(disk_bytes(step_dir) / 1e9, 2),
                         "nvme_gb": round(disk_bytes(out / "nvme_offload") / 1e9, 2)}
    shutil.rmtree(out / "nvme_offload")  # the resume rebuilds it from the checkpoint
    print(json.dumps(result["stopped"]), flush=True)

    # 3. the checkpoint exported offline: weights read from the NVMe swap files
    exported = work / "exported"
    shutil.rmtree(exported, ignore_errors=True)
    run = watched([sys.executable, "-m", "toolkit.export", "--checkpoint", str(step_dir), "--out", str(exported),
                   "--dtype", "bf16"], work / "export.log", args, lambda proc: None)
    result["export"] = {**run, "gb": round(disk_bytes(exported) / 1e9, 2),
                        "files": sorted(p.name for p in exported.iterdir())}
    shutil.rmtree(exported)
    print(json.dumps(result["export"]), flush=True)

    # 4. resumed from the checkpoint, which is deleted once step 2 is logged (it has been read)
    def drop_checkpoint_after_step_two(proc, out):
        if step_dir.exists() and 2 in losses_so_far(out):
            shutil.rmtree(step_dir)

    run = launch(args, out, text, tokenizer, ["resume=auto"], watch=drop_checkpoint_after_step_two)
    summary = json.loads((out / "summary.json").read_text())
    result["resumed"] = {**run, **losses(out), "training_peak_gb": summary["peak_mem_gb_per_rank"],
                         "export_peak_gb": summary["export_peak_mem_gb_per_rank"]}
    shutil.rmtree(out)
    a, b = result["uninterrupted"], result["resumed"]
    result["equal"] = {"step_2_loss_rel": abs(b["step_losses"][2] / a["step_losses"][2] - 1),
                       "eval_loss_rel": abs(b["eval_loss"] / a["eval_loss"] - 1), "rtol": LOSS_RTOL}
    result["resumes_exactly"] = max(result["equal"]["step_2_loss_rel"], result["equal"]["eval_loss_rel"]) <= LOSS_RTOL
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


def losses_so_far(out: Path) -> set:
    return {r["step"] for r in metrics(out) if "loss" in r}


if __name__ == "__main__":
    main()
