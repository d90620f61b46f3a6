"""The run config: typed dataclasses loaded from YAML plus dotted `key=value` overrides.

The key names are the toolkit's public surface. Loading validates everything up front so a bad
config fails before any process group, model or data is touched. This module imports nothing
from the package, so every other module can import it.
"""

from __future__ import annotations

import ast
import atexit
import ctypes
import dataclasses
import difflib
import os
import re
import signal
import sys
import textwrap
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class UserError(Exception):
    """Bad input: the message names the problem and the fix. CLIs print it as one line, exit 2."""


class PeerStopped(Exception):
    """Another rank stopped with an error, which it reports; this rank only exits."""


def run_cli(main) -> None:
    """Run a command's `main()`: a UserError becomes one `error: ...` line (from the main process,
    not once per process) and exit status 2, with no traceback; so does losing another rank."""
    try:
        main()
        status = 0
    except UserError as e:
        if int(os.environ.get("RANK", "0")) == 0 or getattr(e, "print_here", False):
            print(f"error: {e}", file=sys.stderr)
        else:
            let_the_speaker_exit_first(e)
        status = 2
    except PeerStopped:
        let_the_speaker_exit_first(None)
        status = 2
    except RuntimeError as e:
        # torch.distributed's errors when a peer died or stalled past train.collective_timeout
        if not (type(e).__name__.startswith("Dist") or "gloo" in str(e) or "NCCL" in str(e)):
            raise
        print(f"error: rank {os.environ.get('RANK', '0')} lost contact with another rank, which died or stalled "
              f"past train.collective_timeout ({str(e).strip().splitlines()[-1][:200]}): see that rank's output "
              "above; resume=auto continues from the last checkpoint", file=sys.stderr)
        status = 3
    exit_process(status)


def exit_process(status: int) -> None:
    """End this process with `status`. A process started by a launcher (WORLD_SIZE set, even to 1:
    a one-process DeepSpeed launch has a gloo group too) runs its atexit handlers, flushes its
    output and skips the interpreter's teardown.

    Why: torch's gloo process groups keep their threads after `destroy_process_group` (an hsdp run
    ends with 5 gloo event loops and 10 gloo workers alive on every rank: torch's own caches still
    reference the device meshes), so the interpreter is torn down around running C++ threads while
    the other ranks close their sockets. A rank that had trained and saved was aborted there once
    ("terminate called without an active exception", exit -6: the launcher reported the job
    failed). With `_exit` the kernel stops those threads, and nothing runs beside them."""
    if "WORLD_SIZE" not in os.environ:
        if status:
            raise SystemExit(status)
        return
    atexit._run_exitfuncs()  # what a normal exit runs first: train.log's copy is completed there
    sys.stdout.flush()
    sys.stderr.flush()
    ctypes.CDLL(None).fflush(None)  # and C's buffered streams, which only a normal exit flushes
    os._exit(status)


SPEAKER_GRACE_SECONDS = 30.0  # 10 ran out once in CI before the launcher ended the rank (both ranks spoke)


def let_the_speaker_exit_first(error: UserError | None) -> None:
    """On a rank that fails silently while another prints the job's error line: wait before exiting.

    torch's launcher ends every worker as soon as one exits non-zero; a silent rank that exits
    first (a config error is found by every rank within milliseconds) gets the speaker killed
    before it prints. The launcher's SIGTERM ends this wait (the default action, not the
    toolkit's checkpoint-on-SIGTERM handler). If nobody ended it, the error was this rank's own
    (a file missing on this machine only): say so here."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    time.sleep(SPEAKER_GRACE_SECONDS)
    if error is not None:
        print(f"error: rank {os.environ.get('RANK')}: {error}", file=sys.stderr)


@dataclass
class ModelConfig:
    name_or_path: str = "tiny-opt"
    """Hub id (facebook/opt-125m), local HF directory, or preset: tiny-opt, small-opt (77M, 24 narrow
    layers), random-opt-{125m,350m,1.3b,2.7b,6.7b} (random init, real shapes; the same initial weights
    from the same train.seed under every strategy)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, about a third more compute."""
    dropout: float | None = None
    """Override the model's dropout (None keeps the model's own)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) for hub models."""
    attn_implementation: str = "sdpa"
    """sdpa (torch's fused attention) | eager (transformers' own matmuls) | flash_attention_2 (needs the flash-attn
    package, a CUDA GPU and bf16/fp16)."""


@dataclass
class DataConfig:
    train: str | list[str] = ""
    """Local .txt/.jsonl/.json/.csv/.parquet file, a hub dataset as `name` or `name:config`, or
    builtin:stdlib-docs / builtin:sft-tasks / builtin:chat-tasks (made by the toolkit, offline); a list
    of them (`[a.jsonl,b.jsonl]`) mixes several, each in its own format."""
    weights: list[float] | None = None
    """With several `train` sources: each one's share, as a multiple of its examples per epoch (0.5 takes a
    seeded half, 2 every example twice); None weighs every source 1."""
    eval: str | None = None
    """Held-out data, same forms as `train`; None splits `eval_fraction` off the training data."""
    eval_fraction: float = 0.05
    """Share of training documents held out (deterministic by seed) when `eval` is not given."""
    split: str = "train"
    """Split to read from a hub dataset (the held-out one uses `eval_split` when `eval` is a hub name)."""
    eval_split: str = "validation"
    """Split of a hub dataset given as `eval` to read the held-out documents from."""
    block_size: int = 128
    """Tokens per training sequence (text: packed block length; sft: maximum length)."""
    format: str = "auto"
    """auto (from each source's columns) | text (`text` field, packed) | sft (`prompt`/`response` fields, prompt
    masked) | alpaca (`instruction`, optional `input`, `output`, through the Alpaca prompt) | chat (`messages`
    of role/content, or sharegpt `conversations` of from/value, through the chat template; loss on assistant
    turns)."""
    chat_template: str | None = None
    """Chat data: a Jinja chat template, or a file holding one, with each assistant reply inside
    {% generation %}...{% endgeneration %}; None uses the tokenizer's own or, if it has none (OPT), the toolkit's."""
    packing: bool = False
    """sft: put several examples in each `block_size` row instead of padding each to the batch's longest; each
    example still attends only to itself and keeps its own positions (text is always packed)."""
    text_field: str = "text"
    """Column holding the documents of text data."""
    prompt_field: str = "prompt"
    """Column holding the prompts of sft data (not trained on)."""
    response_field: str = "response"
    """Column holding the responses of sft data (trained on)."""
    num_proc: int = 1
    """Processes that tokenize and pack the data (datasets' `map`), on the main process the first time; later
    runs reuse the cache. The other ranks wait for it as long as it takes."""

    def sources(self) -> list[tuple[str, float]]:
        """(source, weight) for each training source."""
        names = [self.train] if isinstance(self.train, str) else self.train
        return list(zip(names, self.weights or [1.0] * len(names)))


@dataclass
class TrainConfig:
    micro_batch_size: int = 8
    """Sequences per process per forward pass."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step on each process."""
    max_steps: int = 0
    """Optimizer steps to run; 0 means `epochs` passes over the training data."""
    epochs: float = 1.0
    """Passes over the training data when `max_steps` is 0 (fractions allowed)."""
    seed: int = 42
    """Seed of the initial weights, the data order and the held-out split."""
    log_every: int = 1
    """Log every N optimizer steps (metrics.jsonl and trackers)."""
    report_to: str = "tensorboard"
    """Trackers besides metrics.jsonl: none | tensorboard (event files in output_dir/tensorboard/) | wandb
    (offline unless logged in and online, or WANDB_MODE is set) | all (tensorboard and wandb)."""
    peak_tflops: float = 0.0
    """Peak TFLOP/s of one device, the denominator of `mfu`; 0: a table of known GPUs, or a matmul probe on CPU."""
    early_stopping_patience: int = 0
    """Stop training (and export final/) after this many evaluations in a row without a lower held-out
    loss than the best so far (0: off; needs eval.every)."""
    max_bad_steps: int = 3
    """Stop after this many bad optimizer steps in a row (each is skipped): a non-finite loss or gradient; under
    fp16 a non-finite loss, or an overflow with the loss scale at `min_loss_scale` (an overflow above it is
    normal: the scaler skips the step and halves the scale)."""
    min_loss_scale: float = 1.0
    """fp16: the floor of the dynamic loss scale (torch's GradScaler; under DeepSpeed the JSON's
    fp16.min_loss_scale, "auto" there takes this value)."""
    stop_check_every: int = 1
    """Ask every rank whether one received SIGTERM/SIGINT/SIGUSR1 (a preemption or time-limit notice) every N
    optimizer steps; they stop together at the first such step, after saving a checkpoint. The vote runs on the
    CPU, never waiting for the GPU."""
    collective_timeout: float = 600.0
    """Seconds a collective (all-reduce, barrier, ...) may wait for a dead or stalled rank before the job ends."""
    fused_loss: bool = True
    """Compute the LM head and its loss chunk by chunk, never the whole logits tensor (the same loss, less time
    and memory); false: transformers' head and loss."""
    cpu_threads: int = 0
    """Threads per process on CPU; 0: this machine's cores / its processes, unless OMP_NUM_THREADS is set above 1
    (`accelerate launch` sets it to 1 by default, which would leave cores idle)."""
    profile_steps: int = 0
    """Record this many optimizer steps with torch.profiler, after two warm-up steps: each rank writes a
    Chrome / Perfetto trace to output_dir/profile/rank<r>.json (collectives show as gloo:* or nccl:* events);
    0: off."""

    def global_batch_size(self, num_processes: int) -> int:
        """Sequences per optimizer step over all ranks."""
        return self.micro_batch_size * self.grad_accum_steps * num_processes


@dataclass
class OptimConfig:
    name: str = "adamw"
    """adamw | adamw_8bit | paged_adamw_8bit | deepspeed (the optimizer the DeepSpeed JSON defines)."""
    lr: float = 3e-4
    """Peak learning rate (after warmup)."""
    weight_decay: float = 0.0
    """AdamW weight decay (never on biases and LayerNorm weights)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.999
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    scheduler: str = "cosine"
    """linear | cosine | constant (all with warmup), via transformers.get_scheduler."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup from 0 to `lr`."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this; 0 turns clipping off (the norm is still logged)."""


@dataclass
class EvalConfig:
    every: int = 0
    """Evaluate on held-out data before training, every N optimizer steps and at the end; 0: only at the end."""
    micro_batch_size: int = 8
    """Held-out sequences per process per forward pass."""
    max_batches: int = 0
    """Cap evaluation at N batches per process (0: the whole held-out set)."""
    sample_prompts: str | list[str] | None = None
    """Prompts the model continues (greedy) at every evaluation, into samples.jsonl and TensorBoard's text tab: a
    list, or a .txt file with one prompt per line. A run on chat data sends each as a user turn through the chat
    template."""
    sample_max_new_tokens: int = 32
    """Tokens generated per sample prompt."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Save a resumable checkpoint every N optimizer steps (0: off)."""
    keep_last: int = 2
    """Keep only the newest N checkpoints (0: keep all)."""
    keep_best: bool = False
    """Also keep the checkpoint with the lowest held-out loss, which keep_last never deletes (needs
    checkpoint.every to be a multiple of eval.every, so every checkpoint has its evaluation)."""
    export_dtype: str = "fp32"
    """fp32 | bf16 | fp16: dtype of the weights in final/ and toolkit.export (fp32: the optimizer's
    master weights, whatever the training precision; 16-bit halves the files)."""
    max_shard_size: str = "2GB"
    """Largest safetensors file in final/ and toolkit.export (Hugging Face's sharding and index): the
    export gathers one parameter at a time and holds at most one such file beyond training memory."""


@dataclass
class LoraConfig:
    enabled: bool = False
    """Train LoRA adapters (peft) instead of all weights; the base weights stay frozen."""
    r: int = 8
    """Rank of the adapters."""
    alpha: int = 16
    """Scaling numerator: the adapter's update is multiplied by alpha / r."""
    dropout: float = 0.05
    """Dropout on the adapters' input."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Modules that get adapters: any of q_proj, k_proj, v_proj, out_proj, fc1, fc2."""
    merge: bool = False
    """Also write `final/merged/`, a full model with the adapter folded in."""
    quantize: str = "none"
    """none | nf4 | fp4: QLoRA, the frozen base's linear layers in 4 bits (bitsandbytes), computing in the run's
    precision; one process or DDP. Without it the frozen base is kept in the compute dtype under bf16/fp16."""


@dataclass
class DdpConfig:
    comm_hook: str = "none"
    """none | bf16 | fp16 | powersgd: how DDP compresses gradients for its all-reduce. bf16/fp16 send them in
    16 bits (half the bytes, averaged gradients rounded); powersgd sends a low-rank approximation of each
    gradient matrix, with error feedback. DDP only (accelerate_configs/ddp.yaml)."""
    powersgd_rank: int = 1
    """Rank of PowerSGD's approximation of each gradient matrix: higher sends more, closer to the exact gradient."""
    powersgd_start_step: int = 1000
    """Optimizer steps of uncompressed all-reduce before PowerSGD starts (at least 2; torch's default 1000:
    early gradients are the most sensitive to compression)."""
    bucket_cap_mb: int = 25
    """Megabytes of gradients per DDP all-reduce bucket: smaller ones start communicating earlier in backward,
    larger ones make fewer calls."""
    static_graph: bool = False
    """Tell DDP that every step uses the same parameters in the same order, so it can skip re-checking them."""


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    ddp: DdpConfig = field(default_factory=DdpConfig)
    resume: str = "none"
    """none | auto (newest checkpoint in output_dir, if any) | PATH to a checkpoint directory."""
    output_dir: str = "runs/default"
    """Where the run writes config.yaml, metrics.jsonl, summary.json, curves.png, tensorboard/, checkpoints/, final/."""
    runtime: dict = field(default_factory=dict)
    """Written by the toolkit, not read: what actually ran (processes, strategy, versions...)."""


CHOICES = {
    "data.format": ("auto", "text", "sft", "alpaca", "chat"),
    "model.attn_implementation": ("sdpa", "eager", "flash_attention_2"),
    "lora.quantize": ("none", "nf4", "fp4"),
    "optim.name": ("adamw", "adamw_8bit", "paged_adamw_8bit", "deepspeed"),
    "optim.scheduler": ("linear", "cosine", "constant"),
    "checkpoint.export_dtype": ("fp32", "bf16", "fp16"),
    "train.report_to": ("none", "tensorboard", "wandb", "all"),
    "ddp.comm_hook": ("none", "bf16", "fp16", "powersgd"),
}
POSITIVE = ("data.block_size", "train.micro_batch_size", "train.grad_accum_steps", "train.log_every",
            "train.max_bad_steps", "train.collective_timeout", "train.min_loss_scale", "train.stop_check_every",
            "data.num_proc", "eval.sample_max_new_tokens",
            "eval.micro_batch_size", "lora.r", "lora.alpha", "optim.lr", "ddp.powersgd_rank", "ddp.bucket_cap_mb")
NON_NEGATIVE = ("train.max_steps", "train.epochs", "train.peak_tflops", "optim.weight_decay", "optim.warmup_steps",
                "optim.max_grad_norm", "eval.every", "eval.max_batches", "checkpoint.every", "train.profile_steps",
                "checkpoint.keep_last", "lora.dropout", "train.early_stopping_patience")
# Optimizer steps train.profile_steps leaves unrecorded first: memory is allocated, DDP builds its
# buckets, ZeRO-3 learns the order parameters are used in.
PROFILE_WARMUP = 2


def field_docs() -> dict[str, str]:
    """{"train.max_steps": its docstring, ...}: the string literal under each field above, read from
    this module's source (Python keeps no such docstrings at runtime)."""
    try:
        tree = ast.parse(Path(__file__).read_text())
    except OSError:  # installed without sources: help without meanings, rather than no help
        return {}
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    sections = {name: hint.__name__ for name, hint in typing.get_type_hints(RunConfig).items()
                if dataclasses.is_dataclass(hint)}
    docs = {}
    for prefix, class_name in [("", "RunConfig"), *((f"{s}.", c) for s, c in sections.items())]:
        body = classes[class_name].body
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[prefix + node.target.id] = " ".join(after.value.value.split())
    return docs


def help_text(width: int = 100) -> str:
    """Every run config key with its default and meaning, generated from the dataclasses and their
    field docstrings, so `--help` cannot drift from the code."""
    docs = field_docs()
    lines = ["run config keys (in the --config YAML, or as key=value overrides; shown with their defaults):"]
    for key, default in _keys(RunConfig(), ""):
        lines.append(f"  {key}={_show(default)}")
        lines += textwrap.wrap(docs.get(key, ""), width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def unknown_flags(unknown: list[str], argv: list[str]) -> str:
    """The error for command-line flags the toolkit does not take (`--max_steps 10`): run config keys
    are `key=value` overrides, so name the key each flag most likely meant (its value: what followed
    it in `argv`)."""
    keys = [key for key, _ in _keys(RunConfig(), "")]
    flags = [a for a in unknown if a.startswith("-")] or unknown
    hints = []
    for flag in (a for a in flags if a.startswith("--")):
        name, _, value = flag[2:].partition("=")
        after = argv[argv.index(flag) + 1:argv.index(flag) + 2]
        value = value or (after[0] if after and not after[0].startswith("-") and "=" not in after[0] else "VALUE")
        meant = [k for k in keys if k.rsplit(".", 1)[-1] == name.replace("-", "_")]
        if meant:
            hints.append(f"{meant[0]}={value}")
    return (f"unrecognized arguments: {' '.join(flags)}; run config keys are key=value overrides, not flags: "
            + (f"write {' '.join(hints)}" if hints else "see --help for the keys"))


def _keys(obj, prefix: str):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _keys(value, f"{prefix}{f.name}.")
        elif f.name != "runtime":  # written by the toolkit into config.yaml, not a setting
            yield prefix + f.name, value


def _show(value) -> str:
    """A default as it is written on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(map(str, value))
    return "null" if value is None else '""' if value == "" else str(value)


def load(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config (or start from defaults), apply `a.b=value` overrides, validate."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {path} does not exist: pass an existing YAML file to --config")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise UserError(f"config file {path} is not valid YAML{where}: fix the syntax") from None
        if not isinstance(raw, dict):
            raise UserError(f"config file {path} must hold a mapping of sections, not {type(raw).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} is not key=value: write it like train.max_steps=100")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override {item!r}: {part} is not a section")
        node[leaf] = yaml.safe_load(value) if value != "" else None
    cfg = _build(RunConfig, raw, "")
    validate(cfg)
    return cfg


def _build(cls, raw, prefix: str):
    if not isinstance(raw, dict):
        raise UserError(f"{prefix.rstrip('.') or 'config'} must be a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f"; valid keys: {', '.join(names)}"
            raise UserError(f"unknown config key {prefix}{key}{hint}")
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(hint, value, key: str):
    if dataclasses.is_dataclass(hint):
        return _build(hint, value or {}, key + ".")
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise UserError(f"{key} needs a value, got nothing")
    for option in options:
        if option is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:  # YAML 1.1 reads 1e-4 (no dot) as a string
                return float(value)
            except ValueError:
                pass
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option in (str, bool, dict) and isinstance(value, option):
            return value
        if typing.get_origin(option) is list:
            if isinstance(value, str):  # `lora.target_modules=q_proj,v_proj` on the command line
                value = [v for v in value.split(",") if v]
            (item,) = typing.get_args(option)
            if isinstance(value, list) and item is str and all(isinstance(v, str) for v in value):
                return value
            if isinstance(value, list) and item is float and not any(isinstance(v, bool) for v in value):
                try:  # `data.weights=1,0.5` arrives as strings
                    return [float(v) for v in value]
                except (TypeError, ValueError):
                    pass
    wanted = " or ".join(str(o) if typing.get_args(o) else o.__name__ for o in options if o is not type(None))
    raise UserError(f"{key} must be {wanted}, got {value!r}")


def get(cfg: RunConfig, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: RunConfig) -> None:
    for key, allowed in CHOICES.items():
        if get(cfg, key) not in allowed:
            raise UserError(f"{key} must be one of {', '.join(allowed)}, got {get(cfg, key)!r}")
    for key in POSITIVE:
        if not get(cfg, key) > 0:
            raise UserError(f"{key} must be > 0, got {get(cfg, key)!r}")
    for key in NON_NEGATIVE:
        if get(cfg, key) < 0:
            raise UserError(f"{key} must be >= 0, got {get(cfg, key)!r}")
    if not cfg.data.train:
        raise UserError("data.train is not set: give a training file or hub dataset, e.g. data.train=data/train.jsonl")
    if cfg.data.weights is not None:
        sources = [cfg.data.train] if isinstance(cfg.data.train, str) else cfg.data.train
        if len(cfg.data.weights) != len(sources) or not all(w > 0 for w in cfg.data.weights):
            raise UserError(f"data.weights={_show(cfg.data.weights)} must give one weight > 0 for each of the "
                            f"{len(sources)} data.train sources, in the same order")
    if cfg.train.max_steps == 0 and cfg.train.epochs == 0:
        raise UserError("train.max_steps and train.epochs are both 0: set one of them")
    profiled_to = PROFILE_WARMUP + cfg.train.profile_steps
    if cfg.train.profile_steps and 0 < cfg.train.max_steps < profiled_to:
        raise UserError(f"train.profile_steps={cfg.train.profile_steps} records steps {PROFILE_WARMUP + 1} to "
                        f"{profiled_to} but train.max_steps is {cfg.train.max_steps}: "
                        "raise train.max_steps or lower train.profile_steps")
    if not 0 < cfg.data.eval_fraction < 1:
        raise UserError(f"data.eval_fraction must be between 0 and 1, got {cfg.data.eval_fraction}")
    if cfg.lora.dropout >= 1 or (cfg.model.dropout is not None and not 0 <= cfg.model.dropout < 1):
        raise UserError("dropout must be in [0, 1)")
    if cfg.lora.merge and not cfg.lora.enabled:
        raise UserError("lora.merge=true needs lora.enabled=true")
    if cfg.lora.quantize != "none" and not cfg.lora.enabled:
        raise UserError(f"lora.quantize={cfg.lora.quantize} quantizes LoRA's frozen base: set lora.enabled=true")
    if cfg.ddp.powersgd_start_step < 2:
        raise UserError(f"ddp.powersgd_start_step must be >= 2 (PowerSGD needs two uncompressed steps to start "
                        f"from), got {cfg.ddp.powersgd_start_step}")
    check_size("checkpoint.max_shard_size", cfg.checkpoint.max_shard_size)
    if cfg.checkpoint.keep_best and not (cfg.checkpoint.every and cfg.eval.every
                                         and cfg.checkpoint.every % cfg.eval.every == 0):
        raise UserError(f"checkpoint.keep_best needs an evaluation at every checkpoint: set checkpoint.every to a "
                        f"multiple of eval.every (now {cfg.checkpoint.every} and {cfg.eval.every}, 0 is off)")
    if cfg.train.early_stopping_patience and not cfg.eval.every:
        raise UserError("train.early_stopping_patience counts evaluations: set eval.every too")
    prompts = cfg.eval.sample_prompts
    if isinstance(prompts, str) and not (Path(prompts).is_file() and Path(prompts).suffix == ".txt"):
        raise UserError(f"eval.sample_prompts={prompts} is not a .txt file: give one with a prompt per line, "
                        "or a list like eval.sample_prompts='[The river,Once upon a time]'")
    if cfg.lora.enabled and not cfg.lora.target_modules:
        raise UserError("lora.target_modules is empty: name the modules to adapt, e.g. q_proj,v_proj")


def check_size(key: str, text: str) -> None:
    """A file size as Hugging Face writes them: 500MB, 2GB (powers of 10) or 5GiB (powers of 2)."""
    if not re.fullmatch(r"\d+(\.\d+)?[KMGT]i?B", text):
        raise UserError(f"{key} must be a size like 500MB or 2GB (GiB for powers of 2), got {text!r}")


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def save(cfg: RunConfig, path: str | Path) -> None:
    from .files import write_text  # (imports nothing from the package either)

    write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))  # never a half-written config.yaml


def reference_table() -> str:
    """README.md's run config reference: every key with its default and meaning, generated from the
    dataclasses and their field docstrings like `--help` (tests/test_config.py keeps the README's equal)."""
    docs = field_docs()
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for key, default in _keys(RunConfig(), ""):
        meaning = docs.get(key, "").replace("|", "\\|")
        rows.append(f"| `{key}` | `{_show(default)}` | {meaning} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    """`python -m toolkit.config --config RUN.yaml [key=value ...] --get output_dir`: one resolved
    value, as training would see it (job scripts read the run's output_dir so); `--reference`: the
    README's table of every key."""
    import argparse

    parser = argparse.ArgumentParser(prog="toolkit.config", description="Print one value of a run config, or the "
                                                                       "reference table of every key.")
    parser.add_argument("--config", help="YAML run config")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--get", metavar="KEY", help="dotted key, e.g. output_dir or train.max_steps")
    what.add_argument("--reference", action="store_true", help="print the Markdown table of every key (README.md)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, as toolkit.train takes them")
    args = parser.parse_args(argv)
    if args.reference:
        print(reference_table())
        return
    cfg = load(args.config, args.overrides)
    try:
        print(_show(get(cfg, args.get)))
    except AttributeError:
        raise UserError(f"{args.get} is not a config key: see `python -m toolkit.train --help`") from None


if __name__ == "__main__":
    run_cli(main)
