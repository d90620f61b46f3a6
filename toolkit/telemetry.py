"""What a run reports: metrics.jsonl, trackers (TensorBoard, wandb), a progress bar, throughput,
MFU, memory and bytes communicated (measured by measure.py and comm.py), and at the end a summary
(printed, summary.json) and curves.png.

Only the main process writes; every method of `Telemetry` is safe to call on every rank (and
`throughput` must be: it is the one collective of a logged step).
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import re
import socket
import sys
import time
import warnings
from pathlib import Path
from urllib.parse import urlparse

import torch
from tqdm.auto import tqdm

from .comm import KINDS, CommMeter
from .config import PROFILE_WARMUP, RunConfig, UserError, to_dict
from .files import pyplot, replaced_file, write_figure, write_text
from .launch import Requested
from .measure import count_tokens, peak_memory_gb

# --- the console log --------------------------------------------------------------------------------


class ConsoleCopy:
    """Everything this process writes to stdout and stderr (Python, warnings, the C++ of torch and
    DeepSpeed), copied at the file descriptors (libraries hold their own sys.stderr and print from
    C). Held in memory until `write_to(path)`, then appended there: a run that is refused at start
    leaves its output_dir's log as it was. Progress-bar redraws keep only their last state per line."""

    def __init__(self):
        import atexit
        import threading

        self.lock = threading.Lock()
        self.held, self.log = [], None
        self.copies = []
        for fd in (1, 2):
            console = os.dup(fd)
            read, write = os.pipe()
            os.dup2(write, fd)
            os.close(write)
            thread = threading.Thread(target=self._copy, args=(read, console), daemon=True)
            thread.start()
            self.copies.append((fd, console, thread))
        atexit.register(self._finish)

    def write_to(self, path: Path) -> None:
        with self.lock:
            self.log = path.open("ab")
            self.log.write(b"".join(self.held))
            self.log.flush()
            self.held = []

    def _copy(self, read: int, console: int) -> None:
        pending = b""
        while chunk := os.read(read, 65536):
            os.write(console, chunk)
            *lines, pending = (pending + chunk).split(b"\n")
            self._keep(b"".join(line.rsplit(b"\r", 1)[-1] + b"\n" for line in lines))
        self._keep(pending.rsplit(b"\r", 1)[-1])
        os.close(read)

    def _keep(self, text: bytes) -> None:
        with self.lock:
            if self.log is None:
                self.held.append(text)
            elif text:
                self.log.write(text)
                self.log.flush()

    def _finish(self) -> None:
        """At exit: give the descriptors back, so the copies read to the end of their pipes."""
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, console, _ in self.copies:
            os.dup2(console, fd)
        for _, _, thread in self.copies:
            thread.join(timeout=10)
        if self.log is not None:
            self.log.close()


# --- known third-party noise ----------------------------------------------------------------------


class _DropMessages(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet_known_noise() -> None:
    """Silence third-party messages known to be harmless here, each by its logger and exact text,
    so every other warning still shows. Call first thing in a CLI's main, before the libraries load
    (a filter on a logger that does not exist yet is kept: `getLogger` creates it, they reuse it)."""
    dropped = {
        # bitsandbytes' optional CPU kernels from the Hub (the `kernels` package, which the newest
        # releases install, fetches them; offline or without it the loading fails and is said, kernel by
        # kernel): faster 4-bit matmuls, without which QLoRA computes the same through its own
        "bitsandbytes.backends.cpu.ops": r"kernels-community|pip install kernels",
        # ... and under HF_HUB_OFFLINE `kernels` first says it cannot check that kernel's publisher
        "kernels._internals.hf_hub": r"publisher trust check for 'kernels-community/quantization-bitsandbytes'",
        # OPT ties lm_head to the token embeddings: saving stores the tensor once, loading re-ties it
        "accelerate.utils.other": r"Removed shared tensor \{'(base_model\.model\.)?lm_head\.weight'\} while saving",
    }
    if Requested.from_env().kind != "deepspeed":
        # DeepSpeed, imported by other libraries, says where it would run; this run does not use it
        dropped["DeepSpeed"] = r"Setting accelerator to CPU"
    for name, pattern in dropped.items():
        logging.getLogger(name).addFilter(_DropMessages(pattern))
    # torch deprecates these collectives in favour of *_single ones; DeepSpeed (and accelerate) still
    # call them, and they work.
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated")
    # peft reads transformers' `is_gradient_checkpointing`, which transformers 5 renames; it works
    warnings.filterwarnings("ignore", category=FutureWarning, message=r"`is_gradient_checkpointing` is deprecated")


# --- trackers -------------------------------------------------------------------------------------


def trackers(report_to: str, output_dir: str | Path) -> list | None:
    """accelerate's `log_with` for `train.report_to`. TensorBoard writes its event files straight
    into output_dir/tensorboard/ (a tracker instance with an empty run name); wandb is named, so the
    project passed to `init_trackers` becomes its project."""
    if report_to == "none":
        return None
    chosen = []
    if report_to in ("tensorboard", "all"):
        from accelerate.tracking import TensorBoardTracker
        chosen.append(TensorBoardTracker("", Path(output_dir) / "tensorboard"))
    if report_to in ("wandb", "all"):
        import importlib.util
        if importlib.util.find_spec("wandb") is None:
            raise UserError(f"train.report_to={report_to} needs wandb, which is not installed: pip install wandb, "
                            "or set train.report_to=tensorboard")
        chosen.append("wandb")
    return chosen


def flatten(config: dict, prefix: str = "") -> dict:
    """{"train.max_steps": 4, "lora.target_modules": "q_proj,v_proj", ...}: the values trackers
    accept as hyperparameters (TensorBoard refuses lists and nested dicts)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        elif isinstance(value, (list, tuple)):
            flat[prefix + key] = ",".join(str(v) for v in value)
        else:
            flat[prefix + key] = value
    return flat


def choose_wandb_mode() -> str:
    """wandb runs offline (files in output_dir/wandb, `wandb sync` later) unless it is logged in and
    its server answers; a WANDB_MODE the user set always wins. Returns the mode."""
    if "WANDB_MODE" not in os.environ:
        host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
        if not (_wandb_logged_in(host) and _reachable(host)):
            os.environ["WANDB_MODE"] = "offline"
    return os.environ.get("WANDB_MODE", "online")


def _wandb_logged_in(host: str) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:  # `wandb login` stores the key in ~/.netrc
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _reachable(host: str, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


# --- the run's reporter ---------------------------------------------------------------------------


class Telemetry:
    def __init__(self, accelerator, cfg: RunConfig, max_steps: int, flops: dict, start_step: int = 0):
        """`flops`: model_flops and peak_flops of this run, what MFU is computed from."""
        self.accelerator = accelerator
        self.is_main = accelerator.is_main_process
        self.out = Path(cfg.output_dir)
        self.path = self.out / "metrics.jsonl"
        self.max_steps = max_steps
        self.bar = tqdm(total=max_steps, initial=start_step, disable=not self.is_main, desc="train",
                        dynamic_ncols=True, file=sys.stdout)
        self.flops_per_token = flops.get("flops_per_token", 0)
        self.attention_flops = flops.get("attention_flops_per_token_per_position", 0)
        # Peak of all processes together (each has a device like the main one's), for MFU.
        self.peak_flops = flops.get("peak_tflops", 0) * 1e12 * accelerator.num_processes
        # This rank's [real tokens, padded tokens, model FLOPs] since the last logged step.
        self.pending = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
        # The clock runs only inside optimizer steps: evaluation and checkpoints don't count against throughput.
        self.step_start = self.window_time = 0.0
        self.started = time.perf_counter()
        self.totals = {"input_tokens": 0.0, "padded_tokens": 0.0, "flops": 0.0, "seconds": 0.0, "peak_mem_gb": 0.0}
        self.peak_per_rank = [0.0] * accelerator.num_processes  # in training, GB
        # `with telemetry.comm:` around what the strategy communicates in (comm.py: what counts).
        self.comm = CommMeter()
        self.comm_steps = 0  # optimizer steps since the last logged one
        self.comm_totals = dict.fromkeys(KINDS, 0)
        self.evals: list[dict] = []
        self._start_trackers(cfg, start_step)
        self.profiler = start_profiler(cfg, accelerator.process_index)

    def _start_trackers(self, cfg: RunConfig, start_step: int) -> None:
        """All ranks call accelerate's init_trackers; it starts them on the main process only."""
        from accelerate.tracking import TensorBoardTracker

        names = [getattr(t, "name", str(t)) for t in self.accelerator.log_with]
        for tracker in self.accelerator.log_with:
            if isinstance(tracker, TensorBoardTracker):
                # TensorBoard hides what an earlier run in this output_dir logged after the step we
                # start from (a resume's checkpoint), as trim_metrics drops it from metrics.jsonl.
                # The tracker passes init_kwargs to SummaryWriter.
                tracker.init_kwargs["purge_step"] = start_step + 1
        if "wandb" in names and self.is_main:
            choose_wandb_mode()
        # The run config goes to wandb only: TensorBoard would store it as hparams in a timestamped
        # folder of its own, empty of scalars (config.yaml holds it beside the events).
        self.accelerator.init_trackers(os.environ.get("WANDB_PROJECT", "toolkit"), init_kwargs={"wandb": {
            "name": self.out.name, "dir": str(self.out), "config": flatten(to_dict(cfg))}})

    def step_begins(self) -> None:
        self.step_start = time.perf_counter()

    def count_batch(self, batch: dict) -> None:
        """After each micro-batch on each rank: its tokens and model FLOPs (no collective, no sync)."""
        real, padded = count_tokens(batch)
        per_token = self.flops_per_token + self.attention_flops * batch["input_ids"].shape[1]
        self.pending[0] += real
        self.pending[1] += padded
        self.pending[2] += real.double() * per_token

    def advance(self, steps: int = 1) -> None:
        """After each optimizer step."""
        self.window_time += time.perf_counter() - self.step_start
        self.comm_steps += steps
        self.bar.update(steps)
        if self.profiler is not None:
            self.profiler.step()

    def throughput(self) -> dict:
        """All ranks, at a logged step: rates over all ranks since the previous logged step, from one
        all-gather of every rank's [real tokens, padded tokens, FLOPs, peak memory]."""
        mine = torch.cat([self.pending, torch.tensor([peak_memory_gb()], dtype=torch.float64,
                                                     device=self.pending.device)])
        ranks = self.accelerator.gather(mine).view(-1, 4).cpu()
        real, padded, flops = ranks[:, :3].sum(0).tolist()
        mem_max = ranks[:, 3].max().item()
        seconds = max(self.window_time, 1e-9)
        self.pending.zero_()
        self.window_time = 0.0
        for key, value in (("input_tokens", real), ("padded_tokens", padded), ("flops", flops), ("seconds", seconds)):
            self.totals[key] += value
        self.totals["peak_mem_gb"] = max(self.totals["peak_mem_gb"], mem_max)
        self.peak_per_rank = [max(a, b) for a, b in zip(self.peak_per_rank, ranks[:, 3].tolist())]
        return {"input_tokens": int(real), "tokens_per_s": round(real / seconds, 1),
                "padded_tokens_per_s": round(padded / seconds, 1),
                "mfu": _significant(flops / seconds / self.peak_flops) if self.peak_flops else None,
                "peak_mem_gb": round(ranks[0, 3].item(), 3), "peak_mem_gb_max": round(mem_max, 3)}

    def communication(self) -> dict:
        """At a logged step: the bytes this rank sent through the strategy's collectives since the
        previous record, per optimizer step, in total and by kind (every kind, zeros included).
        The same on every rank by comm.py's convention, so no collective is needed."""
        sent = self.comm.take()
        for kind, value in sent.items():
            self.comm_totals[kind] += value
        steps = max(self.comm_steps, 1)
        self.comm_steps = 0
        return {"comm_bytes": sum(sent.values()) // steps,
                **{f"comm_bytes_{kind}": value // steps for kind, value in sent.items()}}

    def log(self, record: dict) -> None:
        if not self.is_main:
            return
        record = {**record, "time": round(time.time(), 3)}  # wall clock, when it was logged
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {tracker_tag(k): v for k, v in record.items()
                   if k not in ("step", "time") and isinstance(v, (int, float))}
        self.accelerator.log(scalars, step=record["step"])
        if "loss" in record:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", refresh=False)
        if "eval_loss" in record:
            self.evals.append(record)
            self.bar.write(f"step {record['step']}: eval_loss {record['eval_loss']:.4f} "
                           f"eval_perplexity {record['eval_perplexity']:.3f}")

    def log_samples(self, step: int, completions: dict[str, str]) -> None:
        """Main process: each prompt's completion at this evaluation, into samples.jsonl and the trackers' text."""
        if not self.is_main:
            return
        with (self.out / "samples.jsonl").open("a") as f:
            for prompt, completion in completions.items():
                f.write(json.dumps({"step": step, "prompt": prompt, "completion": completion}) + "\n")
        self.accelerator.log({f"samples/{i}": f"{prompt} **{completion}**"
                              for i, (prompt, completion) in enumerate(completions.items())}, step=step)

    def close(self) -> None:
        """All ranks, when the loop ends (done, stopped by a signal, or too many bad steps): the
        main process prints the summary and writes summary.json and curves.png."""
        self.bar.close()
        if self.profiler is not None:
            self.profiler.stop()  # writes the trace of a run that ended inside the recorded steps
            self.profiler = None
        if not self.is_main:
            return
        if len(self.evals) > 1:
            first, last = self.evals[0], self.evals[-1]
            print(f"held-out perplexity {first['eval_perplexity']:.2f} at step {first['step']} -> "
                  f"{last['eval_perplexity']:.2f} at step {last['step']}")
        records = read_metrics(self.path)
        summary = self.summary(records)
        write_text(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        print(summary_line(summary), flush=True)
        plot_curves(records, self.out / "curves.png", title=self.out.name)

    def summary(self, records: list[dict]) -> dict:
        """The whole run's loss and evaluations (metrics.jsonl, across resumes); this session's
        tokens, time, rates and bytes sent (a resumed run starts counting again)."""
        train = [r for r in records if "loss" in r]
        evals = [r for r in records if "eval_perplexity" in r]
        best = min(evals, key=lambda r: r["eval_perplexity"], default=None)
        t = self.totals
        seconds = max(t["seconds"], 1e-9)
        comm = {kind: value + self.comm.sent[kind] for kind, value in self.comm_totals.items()}  # + not yet logged
        return {
            "steps": train[-1]["step"] if train else 0, "max_steps": self.max_steps,
            "tokens": train[-1]["tokens"] if train else 0,  # target tokens trained on, as in metrics.jsonl
            "input_tokens": int(t["input_tokens"]), "padded_tokens": int(t["padded_tokens"]),
            "wall_time_s": round(time.perf_counter() - self.started, 2), "train_time_s": round(t["seconds"], 2),
            "tokens_per_s": round(t["input_tokens"] / seconds, 1),
            "padded_tokens_per_s": round(t["padded_tokens"] / seconds, 1),
            "mfu": _significant(t["flops"] / seconds / self.peak_flops) if self.peak_flops and t["flops"] else None,
            "final_loss": train[-1]["loss"] if train else None,
            "best_eval_perplexity": best["eval_perplexity"] if best else None,
            "best_eval_step": best["step"] if best else None,
            # the last evaluation's metrics (eval_loss, eval_perplexity, ... as in metrics.jsonl)
            **({f"final_{k}": v for k, v in evals[-1].items() if k.startswith("eval_")} if evals else {}),
            "peak_mem_gb": round(max(t["peak_mem_gb"], peak_memory_gb()), 3),
            "peak_mem_gb_per_rank": [round(v, 3) for v in self.peak_per_rank],
            # this session's bytes sent by this rank through the strategy's collectives (comm.py)
            "comm_bytes": sum(comm.values()),
            **{f"comm_bytes_{kind}": value for kind, value in comm.items()},
        }


PERF = ("tokens_per_s", "padded_tokens_per_s", "input_tokens", "mfu", "peak_mem_gb", "optim_state")


def tracker_tag(name: str) -> str:
    """The tracker's name for a metrics.jsonl key, grouped as TensorBoard and wandb show groups:
    eval/perplexity, comm/all_gather_bytes, perf/tokens_per_s, train/loss."""
    if name.startswith("eval_"):
        return "eval/" + name.removeprefix("eval_")
    if name.startswith("comm_bytes"):
        return "comm/" + (name.removeprefix("comm_bytes_") if name != "comm_bytes" else "total") + "_bytes"
    if name.startswith(PERF):
        return "perf/" + name
    return "train/" + name


def add_to_summary(accelerator, out: Path, **fields) -> None:
    """What is measured after the loop (the export's memory), added to summary.json by the main process."""
    if accelerator.is_main_process:
        path = out / "summary.json"
        summary = json.loads(path.read_text()) if path.is_file() else {}
        write_text(path, json.dumps({**summary, **fields}, indent=2) + "\n")


def start_profiler(cfg: RunConfig, rank: int):
    """train.profile_steps: a running torch.profiler that skips PROFILE_WARMUP optimizer steps (the
    first records would show allocation and set-up, not the steady step), then records the next
    profile_steps, one `ProfilerStep#k` span each, and writes this rank's Chrome trace to
    output_dir/profile/rank<r>.json. None when off. `step()` it after each optimizer step."""
    if not cfg.train.profile_steps:
        return None
    from torch.profiler import ProfilerActivity, profile, schedule

    folder = Path(cfg.output_dir) / "profile"

    def write_trace(profiler) -> None:
        folder.mkdir(exist_ok=True)
        with replaced_file(folder / f"rank{rank}.json") as tmp:
            profiler.export_chrome_trace(str(tmp))

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    profiler = profile(activities=activities, on_trace_ready=write_trace,
                       schedule=schedule(wait=PROFILE_WARMUP - 1, warmup=1, active=cfg.train.profile_steps, repeat=1))
    profiler.start()
    return profiler


def summary_line(s: dict) -> str:
    parts = [f"step {s['steps']}/{s['max_steps']}", f"{s['input_tokens']:,} tokens in {s['wall_time_s']:.1f} s",
             f"{s['tokens_per_s']:,.0f} tokens/s"]
    if s["mfu"] is not None:
        parts.append(f"mfu {s['mfu']:.2%}")
    if s["final_loss"] is not None:
        parts.append(f"final loss {s['final_loss']:.4f}")
    if s["best_eval_perplexity"] is not None:
        parts.append(f"best eval perplexity {s['best_eval_perplexity']:.3f} (step {s['best_eval_step']})")
    parts.append(f"peak memory {s['peak_mem_gb']:.2f} GB")
    return "summary: " + ", ".join(parts)


def read_metrics(path: Path) -> list[dict]:
    """The records of metrics.jsonl; a last line cut short by a kill mid-write is skipped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return records


def trim_metrics(path: Path, last_step: int) -> None:
    """Keep the records up to `last_step`: a resumed run redoes the steps after its checkpoint."""
    if path.exists():
        write_text(path, "".join(json.dumps(r) + "\n" for r in read_metrics(path) if r["step"] <= last_step))


def plot_curves(records: list[dict], path: Path, title: str = "") -> None:
    """Training and held-out loss on one axis (over-fitting shows as the two parting), held-out
    perplexity on a log axis (step 0's is orders of magnitude above the rest), learning rate, grad
    norm, throughput and memory by step; `title`: the run's name."""
    train = [r for r in records if "loss" in r and math.isfinite(r["loss"])]
    evals = [r for r in records if "eval_loss" in r]
    if not train:
        return
    plt = pyplot()

    def line(ax, rows, key, label=None):
        rows = [r for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], "o-" if len(rows) < 30 else "-", markersize=3,
                label=label)

    fig, axes = plt.subplots(2, 3, figsize=(13.5, 7))
    (loss, perplexity, lr), (grad_norm, speed, memory) = axes
    line(loss, train, "loss", "training")
    if evals:
        line(loss, evals, "eval_loss", "held-out")
        line(perplexity, evals, "eval_perplexity")
        perplexity.set_yscale("log")
    loss.legend()
    line(lr, train, "lr")
    line(grad_norm, train, "grad_norm")
    line(speed, train, "tokens_per_s")
    line(memory, train, "peak_mem_gb_max")
    for ax, name in ((loss, "loss (nats / token)"), (perplexity, "held-out perplexity (log)"), (lr, "learning rate"),
                     (grad_norm, "gradient norm (before clipping)"), (speed, "tokens / s"),
                     (memory, "peak memory, largest rank (GB)")):
        ax.set_title(name)
        ax.set_xlabel("step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    write_figure(fig, path)


def _significant(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")
