"""What a run reports: metrics.jsonl, trackers (TensorBoard, wandb), a progress bar, throughput,
MFU, memory and bytes communicated, and at the end a summary (printed, summary.json) and curves.png.

Only the main process writes; every method of `Telemetry` is safe to call on every rank (and
`throughput` must be: it is the one collective of a logged step).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import netrc
import os
import re
import resource
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
        # bitsandbytes' optional 4-bit CPU kernels from the Hub; the toolkit uses no 4-bit layers
        "bitsandbytes.backends.cpu.ops": r"Failed to load CPU gemm_4bit_forward from kernels-community",
        # OPT ties lm_head to the token embeddings: saving stores the tensor once, loading re-ties it
        "accelerate.utils.other": r"Removed shared tensor \{'lm_head\.weight'\} while saving",
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


# --- FLOPs: what the model needs per token, what the hardware can do --------------------------------


def model_flops(model) -> dict:
    """Training FLOPs per token, PaLM's way (appendix B): a matmul with a weight costs 2 FLOPs per
    weight element per token forward and 4 backward (gradients of the input and of the weight), so
    6 per trainable parameter; a frozen one (LoRA's base) needs no weight gradient: 4. Attention
    scores and values add 12 * layers * hidden per token per position of context.

    Parameters counted: all but the position embeddings (a lookup). The token embedding counts once,
    for the output projection tied to it (a real vocab x hidden matmul per token). Recomputation
    under activation checkpointing is not counted (MFU, not hardware FLOPs utilization)."""
    trainable = frozen = 0
    for name, p in model.named_parameters():  # each tied tensor once
        if "embed_positions" in name:
            continue
        numel = getattr(p, "ds_numel", p.numel())  # ZeRO-3 placeholders are empty; FSDP2 DTensors report the full size
        if p.requires_grad:
            trainable += numel
        else:
            frozen += numel
    config = model.config
    return {"flops_per_token": 6 * trainable + 4 * frozen,
            "attention_flops_per_token_per_position": 12 * config.num_hidden_layers * config.hidden_size}


# Dense peak TFLOP/s per GPU: (bf16/fp16 tensor cores, fp32), from the vendors' data sheets.
GPU_PEAK_TFLOPS = [
    (r"H100", (989.0, 67.0)),
    (r"A100", (312.0, 19.5)),
    (r"V100", (125.0, 15.7)),
    (r"A10G", (125.0, 31.2)),
    (r"\bL4\b", (121.0, 30.3)),
    (r"RTX 4090", (165.0, 82.6)),
    (r"\bT4\b", (65.0, 8.1)),
]


def peak_flops(accelerator, cfg: RunConfig, mixed_precision: str) -> dict:
    """Peak TFLOP/s of one process's device, the denominator of MFU, and where it comes from:
    train.peak_tflops, else the GPU table, else the best rate of a short matmul probe (on CPU: fp32,
    with this process's threads). Measured once, by the main process only (the others return {})."""
    if not accelerator.is_main_process:
        return {}
    half = mixed_precision in ("bf16", "fp16")
    if cfg.train.peak_tflops > 0:
        return {"peak_tflops": cfg.train.peak_tflops, "peak_tflops_source": "train.peak_tflops"}
    device = accelerator.device
    if device.type == "cuda" and gpu_peak_tflops(torch.cuda.get_device_name(device), half):
        name = torch.cuda.get_device_name(device)
        return {"peak_tflops": gpu_peak_tflops(name, half),
                "peak_tflops_source": f"table: {name}, {'bf16/fp16' if half else 'fp32'} dense"}
    # CPU, or a GPU the table does not know: measure. On a GPU that is a floor, not the data-sheet
    # peak (set train.peak_tflops); on CPU it is what the cores really do with fp32 matmuls.
    dtype = torch.bfloat16 if half and device.type != "cpu" else torch.float32
    n = 1024 if device.type == "cpu" else 8192
    tflops = matmul_tflops(device, dtype, n)
    where = f"{torch.get_num_threads()} thread(s)" if device.type == "cpu" else torch.cuda.get_device_name(device)
    return {"peak_tflops": round(tflops, 4),
            "peak_tflops_source": f"measured: best {n}x{n} {str(dtype).removeprefix('torch.')} matmul, "
                                  f"{device.type}, {where}"}


def gpu_peak_tflops(device_name: str, half: bool) -> float | None:
    for pattern, (half_peak, fp32_peak) in GPU_PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return half_peak if half else fp32_peak
    return None


def matmul_tflops(device, dtype=torch.float32, n: int = 1024, seconds: float = 0.3) -> float:
    """The best rate of n x n matmuls over about `seconds`: the best, not the mean, so a moment of
    contention from other processes on the machine lowers it as little as possible."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b  # warm up: first-call allocation and kernel selection
    sync()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        sync()
        best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best / 1e12


# --- the run's reporter ---------------------------------------------------------------------------


def count_tokens(batch: dict) -> tuple[torch.Tensor, int]:
    """(real tokens: positions with attention_mask 1, all input positions incl. padding) of a batch.
    The real count stays a tensor on the batch's device: counting never waits for the GPU."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    if mask is not None and mask.ndim == 4:  # packed rows (data.Collator.packed): real tokens attend to themselves
        mask = mask.diagonal(dim1=-2, dim2=-1)
    real = mask.sum() if mask is not None else torch.tensor(ids.numel(), device=ids.device)
    return real, ids.numel()


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
        self.accelerator.init_trackers(os.environ.get("WANDB_PROJECT", "toolkit"), config=flatten(to_dict(cfg)),
                                       init_kwargs={"wandb": {"name": self.out.name, "dir": str(self.out)}})

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
        scalars = {k: v for k, v in record.items() if k not in ("step", "time") and isinstance(v, (int, float))}
        self.accelerator.log(scalars, step=record["step"])
        if "loss" in record:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", refresh=False)
        if "eval_loss" in record:
            self.evals.append(record)
            self.bar.write(f"step {record['step']}: eval_loss {record['eval_loss']:.4f} "
                           f"eval_perplexity {record['eval_perplexity']:.3f}")

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
        plot_curves(records, self.out / "curves.png")

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
            "peak_mem_gb": round(max(t["peak_mem_gb"], peak_memory_gb()), 3),
            "peak_mem_gb_per_rank": [round(v, 3) for v in self.peak_per_rank],
            # this session's bytes sent by this rank through the strategy's collectives (comm.py)
            "comm_bytes": sum(comm.values()),
            **{f"comm_bytes_{kind}": value for kind, value in comm.items()},
        }


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


def plot_curves(records: list[dict], path: Path) -> None:
    """Loss and learning rate by step, and held-out perplexity when there is any."""
    train = [r for r in records if "loss" in r and math.isfinite(r["loss"])]
    evals = [r for r in records if "eval_perplexity" in r]
    if not train:
        return
    plt = pyplot()

    panels = [("loss", "training loss (nats / token)", train), ("lr", "learning rate", train)]
    if evals:
        panels.append(("eval_perplexity", "held-out perplexity", evals))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5))
    for ax, (key, title, rows) in zip(axes, panels):
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], "o-" if len(rows) < 30 else "-", markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
    fig.tight_layout()
    write_figure(fig, path)


def _significant(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


def peak_memory_gb() -> float:
    """Peak accelerator memory of this process, or its peak resident memory on CPU, since the
    last `reset_peak_memory` (MemoryAtStart resets it as training begins)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    try:  # Linux: VmHWM, which reset_peak_memory resets (getrusage's ru_maxrss it does not)
        status = Path("/proc/self/status").read_text()
    except OSError:  # not Linux: the peak since the process started (macOS reports bytes)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**30 if sys.platform == "darwin" else 2**20)
    return int(status.split("VmHWM:")[1].split()[0]) / 2**20  # kB


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:  # Linux: "5" resets the process's peak resident set size (VmHWM, not getrusage's ru_maxrss)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # then each peak counts from the start of the process


class MemoryAtStart:
    """What each rank holds before training, phase by phase: the peak while the model is built
    and placed (the whole model on every rank, unless the strategy builds it sharded), then the
    peak through `prepare` (optimizer state, buffers) until the first step. From then on
    `peak_memory_gb` counts the training alone."""

    def __init__(self):
        self.phases = {"before_model": memory_now_gb()}
        reset_peak_memory()

    def mark(self, phase: str) -> None:
        self.phases[phase] = peak_memory_gb()
        reset_peak_memory()

    def per_rank(self, accelerator) -> dict:
        """All ranks: {phase: [GB of rank 0, rank 1, ...]}."""
        mine = torch.tensor(list(self.phases.values()), dtype=torch.float64, device=accelerator.device)
        ranks = accelerator.gather(mine).view(accelerator.num_processes, -1).cpu()
        return {phase: [round(v, 3) for v in ranks[:, i].tolist()] for i, phase in enumerate(self.phases)}


def memory_now_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 2**30
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:  # not Linux
        return peak_memory_gb()
    return int(status.split("VmRSS:")[1].split()[0]) / 2**20  # kB


# --- what the run measures of its model and optimizer ---------------------------------------------


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
