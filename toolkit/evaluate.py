"""The checkpoint-scoring CLI (the evaluation itself, shared with training, is validation.py).

    python -m toolkit.evaluate --checkpoint runs/x/final --data heldout.jsonl
    accelerate launch --config_file accelerate_configs/zero3.yaml -m toolkit.evaluate \\
        --checkpoint runs/x/checkpoints --report runs/x/eval.json

`main` finds what to score (`find_targets`), then per checkpoint: tokenizer -> model -> held-out
data -> `accelerator.prepare` -> weights -> `evaluate_model` (+ greedy samples) -> one row.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from . import config as config_lib
from .config import DataConfig, ModelConfig, RunConfig, UserError, run_cli
from .export import INFO_FILE
from .files import pyplot, write_figure, write_text

# torch, transformers, DeepSpeed and the toolkit modules that load them are imported in the functions
# that use them, after the arguments are read: --help and argument errors answer at once.

COLUMNS = ("loss", "perplexity", "bits_per_byte", "accuracy", "tokens", "documents")
PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="toolkit.evaluate", description="Score checkpoints on held-out data.")
    parser.add_argument("--checkpoint", required=True,
                        help="final/ (HF model or LoRA adapter), checkpoints/step-N, or a run's checkpoints/ folder")
    parser.add_argument("--data", help="held-out .jsonl/.json/.txt/.csv/.parquet file or hub dataset "
                                       "(default: the run's own held-out split)")
    parser.add_argument("--base", help="base model of a LoRA adapter (default: from adapter_config.json or the run)")
    parser.add_argument("--packed", action="store_true", help="score the packed fixed-length blocks training uses")
    parser.add_argument("--max-length", type=int, default=0,
                        help="tokens per window (--packed: per block); default: the model's length (block_size)")
    parser.add_argument("--stride", type=int, default=0, help="new tokens per rolling window (default: half)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per process per forward")
    parser.add_argument("--max-batches", type=int, default=0, help="stop after N batches per process (0: all)")
    parser.add_argument("--report", help="write the results to this JSON file (and a plot next to it)")
    parser.add_argument("--generate", action="append", default=[], metavar="PROMPT",
                        help="print a greedy completion of PROMPT per checkpoint (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="compute precision of the forward passes (default fp32: exact, and cheap for scoring); "
                             "overrides the launch's --mixed_precision")
    args = parser.parse_args(argv)
    for flag in ("max_length", "stride", "max_batches"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise UserError("--batch-size and --max-new-tokens must be >= 1")
    if args.report and not Path(args.report).resolve().parent.is_dir():
        raise UserError(f"--report {args.report}: folder {Path(args.report).parent} does not exist; create it first")
    return args


@dataclass
class Target:
    """One model to score."""
    path: Path
    kind: str
    """model (HF directory) | adapter (PEFT LoRA directory) | state (resumable checkpoints/step-N)."""
    run: RunConfig | None
    """The config.yaml of the run that made it, if there is one (model, LoRA and data settings)."""
    run_dir: Path | None
    step: int | None


def find_targets(checkpoint: str) -> list[Target]:
    """What `--checkpoint` names: one model or checkpoint, or every checkpoint of a run (its directory
    or its checkpoints/ folder) plus its final/."""
    from . import checkpoint as checkpoint_lib

    path = Path(checkpoint)
    fix = "pass a run's final/ directory, a checkpoints/step-N directory or a run's checkpoints/ folder"
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist: {fix}")
    if not path.is_dir():
        raise UserError(f"checkpoint {path} is a file, not a directory: {fix}")
    if (path / "checkpoints").is_dir():  # a run directory: treat it as its checkpoints/ folder
        path = path / "checkpoints"
    elif (path / "config.yaml").is_file() and (path / "final").is_dir():  # a run that saved no checkpoint
        path = path / "final"
    steps = checkpoint_lib.checkpoint_dirs(path)
    if steps:
        targets = [target(p) for p in steps]
        if (path.parent / "final").is_dir():
            targets.append(target(path.parent / "final"))
        return targets
    return [target(path)]


def target(path: Path) -> Target:
    from . import checkpoint as checkpoint_lib

    if (path / checkpoint_lib.STATE_FILE).is_file():
        run_dir = path.parent.parent  # runs/x/checkpoints/step-N
        step = json.loads((path / checkpoint_lib.STATE_FILE).read_text())["step"]
        if not (path / "config.yaml").is_file():
            raise UserError(f"checkpoint {path} has no config.yaml, so its model is unknown: "
                            "pass a checkpoint written by toolkit.train, or its run's final/")
        return Target(path, "state", config_lib.load(path / "config.yaml"), run_dir, step)
    if (path / "adapter_config.json").is_file():
        kind = "adapter"
    elif (path / "config.json").is_file():
        kind = "model"
    else:
        raise UserError(f"{path} is not a model or checkpoint (no config.json, adapter_config.json or "
                        f"{checkpoint_lib.STATE_FILE} in it): pass a run's final/ directory, a "
                        "checkpoints/step-N directory or a run's checkpoints/ folder")
    # An exported model sits in runs/x/final/ (or final/merged/); the run's config is above it.
    # (Exports of earlier toolkit versions have no INFO_FILE: the run's max_steps was final's step.)
    info = next((d / INFO_FILE for d in (path, path.parent) if (d / INFO_FILE).is_file()), None)
    step = json.loads(info.read_text())["step"] if info else None
    for run_dir in (path.parent, path.parent.parent):
        if (run_dir / "config.yaml").is_file():
            run = config_lib.load(run_dir / "config.yaml")
            return Target(path, kind, run, run_dir, step if info else run.runtime.get("max_steps"))
    return Target(path, kind, None, None, step)


def eval_accelerator(targets: list[Target], args):
    """The accelerator for this launch, through the same strategy code as training (all strategies
    on CPU too). Its batch settings are the evaluation's: one micro-batch, no accumulation; its
    precision is `--precision`, whatever the launch said."""
    from . import cpu, strategy

    os.environ["ACCELERATE_MIXED_PRECISION"] = PRECISIONS[args.precision]
    first = targets[0]
    cfg = first.run or RunConfig()
    cfg = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, micro_batch_size=args.batch_size, grad_accum_steps=1,
                                       report_to="none"),
        output_dir=str(first.run_dir or "."))
    cpu.use_cpu_share()  # this launch's share of the cores, as in training
    return strategy.make_accelerator(cfg)


def load_target(accelerator, target: Target, base: str | None):
    """(model, tokenizer, loads_after_prepare). A resumable checkpoint saved under the strategy
    that runs now is read shard by shard after `prepare` (no rank holds the whole model); one of
    another strategy is read into the model on CPU first, a parameter at a time."""
    from transformers import AutoTokenizer

    from . import checkpoint as checkpoint_lib, strategy
    from .model import build_model

    if target.kind == "state":
        model, tokenizer, _ = checkpoint_lib.run_model(target.path)
        sharded_here = checkpoint_lib.layout(target.path) == strategy.checkpoint_layout(accelerator) != "full"
        if not sharded_here:
            checkpoint_lib.load_weights(model, target.path)
        return model, tokenizer, sharded_here
    try:
        tokenizer = AutoTokenizer.from_pretrained(target.path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a tokenizer from {target.path} ({str(e).splitlines()[0]}): "
                        "export the model with its tokenizer files") from None
    if target.kind == "model":
        return build_model(ModelConfig(name_or_path=str(target.path)), tokenizer), tokenizer, False
    return adapter_model(target, tokenizer, base), tokenizer, False


def adapter_model(target: Target, tokenizer, base: str | None):
    import torch
    from peft import PeftModel

    from .model import initial_model, quantized_base

    adapter = json.loads((target.path / "adapter_config.json").read_text())
    base = base or adapter.get("base_model_name_or_path") or (target.run and target.run.model.name_or_path)
    if not base:
        raise UserError(f"adapter {target.path} does not name its base model: pass --base MODEL")
    # A preset base is random-init and not saved with the adapter: the run's seed rebuilds the
    # very same weights (model.initialize_weights).
    seed = target.run.train.seed if target.run else RunConfig().train.seed
    quantize = target.run.lora.quantize if target.run else "none"
    if quantize != "none":  # a QLoRA adapter is scored on the 4-bit base it was trained on
        model = quantized_base(ModelConfig(name_or_path=base), quantize, tokenizer, seed, torch.device("cpu"),
                               torch.float32)
    else:
        model = initial_model(ModelConfig(name_or_path=base), tokenizer, seed)
    try:
        return PeftModel.from_pretrained(model, target.path)
    except RuntimeError as e:  # size mismatch: not the base it was trained on
        raise UserError(f"adapter {target.path} does not fit base model {base} ({str(e).splitlines()[-1].strip()}): "
                        "pass --base with the model it was trained on") from None


def held_out(args, target: Target, tokenizer, max_positions: int):
    """The documents to score, tokenized: --data, or the run's own held-out split."""
    from . import data
    data_cfg = target.run.data if target.run else DataConfig()
    if args.data:
        parts = [data.load_part(args.data, data_cfg, data_cfg.eval_split,
                                fix="rename the data's columns to those (the fields the model was trained with)")]
    elif target.run:
        parts = data.load_raw(target.run.data, target.run.train.seed)[1]
    else:
        raise UserError(f"{target.path} has no run config.yaml to take the held-out split from: pass --data FILE")
    if args.packed:
        block_size = args.max_length or data_cfg.block_size
        data.check_block_size(block_size, max_positions, key="--max-length")
        return packed_blocks(parts, tokenizer, dataclasses.replace(data_cfg, block_size=block_size))
    max_length = args.max_length or max_positions
    data.check_block_size(max_length, max_positions, key="--max-length")
    return data.tokenize_for_eval(parts, tokenizer, data_cfg, max_length=max_length, stride=args.stride or None)


def packed_blocks(parts, tokenizer, data_cfg: DataConfig):
    """Training's blocks, each with the UTF-8 bytes of the tokens it scores (so bits_per_byte
    means the same as unpacked) and the documents that start in it (text: each begins with BOS)."""
    from . import data
    from .data import IGNORE
    blocks = data.tokenize_for_training(parts, tokenizer, data_cfg)
    text = parts[0].format == "text"

    def count(batch):
        out = {"n_bytes": [], "documents": []}
        for i, ids in enumerate(batch["input_ids"]):
            labels = batch["labels"][i] if "labels" in batch else ids
            scored = [t for t in labels[1:] if t != IGNORE]
            out["n_bytes"].append(len(tokenizer.decode(scored, skip_special_tokens=True).encode()))
            out["documents"].append(ids.count(tokenizer.bos_token_id) if text else 1)
        return out

    return blocks.map(count, batched=True, desc="count bytes")


def score(accelerator, target: Target, args) -> dict:
    """All ranks: one checkpoint's row of metrics."""
    import torch

    from . import checkpoint as checkpoint_lib, data, job
    from .loss import fuse_head_and_loss
    from .validation import evaluate_model, generate
    # Outside main_process_first: under ZeRO-3, from_pretrained partitions the weights with
    # collectives that every rank must join (rank 0 alone would wait forever).
    model, tokenizer, loads_after_prepare = load_target(accelerator, target, args.base)
    model = fuse_head_and_loss(model, training=False)  # scores through the chunked head: no full logits
    with job.main_process_first(accelerator):  # rank 0 fills the datasets cache, the others reuse it
        eval_set = held_out(args, target, tokenizer, model.config.max_position_embeddings)
    loader = data.eval_dataloader(eval_set, args.batch_size, tokenizer.pad_token_id)
    # accelerate's FSDP2 path refuses a model without its optimizer, and a DeepSpeed engine without
    # one cannot load a checkpoint (ZeRO-3 weights are restored through the optimizer's partitions):
    # an SGD that is never stepped satisfies both.
    model, _, loader = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.0), loader)
    if loads_after_prepare:
        checkpoint_lib.load_sharded_weights(accelerator, model, target.path)
    row = {"checkpoint": str(target.path), "step": target.step, "precision": args.precision,
           **evaluate_model(model, loader, accelerator, max_batches=args.max_batches)}
    if args.generate:
        row["generations"] = dict(zip(args.generate, generate(accelerator, model, tokenizer, args.generate,
                                                              args.max_new_tokens)))
    accelerator.free_memory(model, loader)  # the next checkpoint gets its own engine / FSDP wrapping
    return row


def main(argv=None) -> None:
    args = parse_args(argv)  # first: it needs no heavy import
    from . import job  # (imports torch)
    from .telemetry import quiet_known_noise

    job.follow_launcher()  # a worker whose launcher is killed stops too (evaluation saves nothing)
    quiet_known_noise()  # before the libraries that print it are loaded
    targets = find_targets(args.checkpoint)
    accelerator = eval_accelerator(targets, args)
    rows = []
    for t in targets:
        row = score(accelerator, t, args)
        rows.append(row)
        accelerator.print(format_row(row, header=len(rows) == 1))
        for prompt, completion in row.get("generations", {}).items():
            accelerator.print(f"    {prompt!r} -> {completion!r}")
    best = min(rows, key=lambda r: r["loss"] if not math.isnan(r["loss"]) else math.inf)
    if len(rows) > 1:
        accelerator.print(f"best: {best['checkpoint']} (perplexity {best['perplexity']:.4f})")
    if args.report and accelerator.is_main_process:
        report = {"data": args.data or "held-out split of the run", "packed": args.packed,
                  "precision": args.precision, "num_processes": accelerator.num_processes, "best": best["checkpoint"], "results": rows}
        write_text(Path(args.report), json.dumps(report, indent=2) + "\n")
        if len(rows) > 1:
            plot(rows, best, Path(args.report).with_suffix(".png"))
    accelerator.wait_for_everyone()
    accelerator.end_training()


def format_row(row: dict, header: bool) -> str:
    name = row["checkpoint"] if len(row["checkpoint"]) <= 40 else "..." + row["checkpoint"][-37:]
    line = f"{name:<40} {row['step'] if row['step'] is not None else '-':>6} " + " ".join(
        f"{row[c]:>13.4f}" if isinstance(row[c], float) else f"{row[c]:>13}" for c in COLUMNS)
    if not header:
        return line
    return f"{'checkpoint':<40} {'step':>6} " + " ".join(f"{c:>13}" for c in COLUMNS) + "\n" + line


def plot(rows: list[dict], best: dict, path: Path) -> None:
    plt = pyplot()

    points = sorted((r for r in rows if r["step"] is not None), key=lambda r: r["step"])
    if not points:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in points]
    ax.plot(steps, [r["perplexity"] for r in points], "o-", color="tab:blue", label="perplexity")
    ax.set_xlabel("step")
    ax.set_ylabel("perplexity", color="tab:blue")
    loss_ax = ax.twinx()
    loss_ax.plot(steps, [r["loss"] for r in points], "s--", color="tab:orange", label="loss")
    loss_ax.set_ylabel("loss (nats / token)", color="tab:orange")
    if best["step"] is not None:
        ax.plot([best["step"]], [best["perplexity"]], "*", color="red", markersize=16, label="best")
        ax.annotate(f"best: {Path(best['checkpoint']).name}", (best["step"], best["perplexity"]),
                    textcoords="offset points", xytext=(8, 8))
    ax.legend(loc="upper right")
    ax.set_title("held-out perplexity by checkpoint")
    fig.tight_layout()
    write_figure(fig, path)


if __name__ == "__main__":
    run_cli(main)
