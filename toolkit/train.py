"""Fine-tune an OPT model: `accelerate launch --config_file CFG -m toolkit.train --config RUN.yaml k=v ...`

`main` wires the run (config -> accelerator -> tokenizer/model -> data -> optimizer -> prepare ->
resume); `train` is the loop, read top to bottom; the result is exported to `output_dir/final/`.

Only the standard library and the config module load with this module, so `--help` and argument
errors answer in a fraction of a second; torch, accelerate, transformers, DeepSpeed and
bitsandbytes (several seconds) are imported where they are used, once the arguments are read.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import config as config_lib
from .config import RunConfig, UserError, run_cli


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="toolkit.train", description=__doc__.splitlines()[0],
                                     epilog=config_lib.help_text(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML run config (examples/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=100")
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        raise UserError(config_lib.unknown_flags(unknown, sys.argv[1:] if argv is None else argv))
    return args


def main(argv=None) -> None:
    args = parse_args(argv)  # first: it needs no heavy import
    cfg = config_lib.load(args.config, args.overrides)  # a bad config fails here, in a fraction of a second
    from . import job  # (imports torch)

    job.follow_launcher()  # before anything slower: a launcher killed meanwhile must not leave us orphaned
    from . import strategy
    from .telemetry import ConsoleCopy, quiet_known_noise

    quiet_known_noise()  # before the libraries that print it are loaded
    stop = job.StopSignal()
    out = Path(cfg.output_dir)
    accelerator = strategy.make_accelerator(cfg)
    console = ConsoleCopy() if accelerator.is_main_process else None  # train.log, once the run is accepted
    lock = None
    try:  # once the lock is claimed, every way out releases it: a refusal below as well as the run's end
        with job.stop_together(accelerator):  # the main process's verdicts reach every rank
            if accelerator.is_main_process:
                lock = claim_output_dir(cfg)
            strategy.check_optimizer(accelerator, cfg)  # an optimizer the strategy can't run stops before any work
            strategy.check_lora(accelerator, cfg)
        with job.stop_together(accelerator):
            job.check_shared(accelerator, lock, out)  # every machine must see the same output_dir
        run(cfg, accelerator, stop, console)
    finally:
        if lock is not None:
            lock.release()


def run(cfg: RunConfig, accelerator, stop, console) -> None:
    import torch
    from accelerate.utils import set_seed

    from . import checkpoint, cpu as cpu_lib, data, export, job, launch, measure, strategy, telemetry
    from .card import model_card
    from .loss import fuse_head_and_loss
    from .model import (apply_lora, build_model, build_tokenizer, initialize_weights, is_preset, model_config,
                        quantized_base)
    from .optim import build_optimizer, build_scheduler

    out = Path(cfg.output_dir)
    shards_parameters = strategy.shards_parameters(accelerator)  # what the CPU allocator keeps depends on it
    cpu = {**cpu_lib.use_cpu_share(cfg.train.cpu_threads), **cpu_lib.tune_cpu_allocator(shards_parameters)}
    state = {"step": 0, "epoch": 0, "batch": 0, "tokens": 0}
    resume_from = checkpoint.find_resume(cfg.resume, out)
    if resume_from is not None:  # refuse a checkpoint that would train something else before any work
        state = checkpoint.check_resume(resume_from, cfg, accelerator.num_processes,
                                        strategy.checkpoint_layout(accelerator))
    set_seed(cfg.train.seed)  # dropout, and peft's LoRA init on a loaded checkpoint, alike on every rank
    with job.main_process_first(accelerator):  # rank 0 builds tokenizer and data caches, the others reuse them
        train_parts, held_out_parts = data.load_raw(cfg.data, cfg.train.seed)
        tokenizer = build_tokenizer(cfg.model, data.plain_texts(train_parts, cfg.data), cache_dir=out / "tokenizer")
        if any(p.format == "chat" for p in train_parts):
            # saved with every checkpoint and final/: users prompt the model the way it was trained
            tokenizer.chat_template = data.chat_template(tokenizer, cfg.data)
        max_positions = model_config(cfg.model, tokenizer).max_position_embeddings
        data.check_block_size(cfg.data.block_size, max_positions)
        train_set = data.tokenize_for_training(train_parts, tokenizer, cfg.data, cfg.train.seed)
        eval_set = data.tokenize_for_eval(held_out_parts, tokenizer, cfg.data, max_length=max_positions)

    memory = measure.MemoryAtStart()
    with job.stop_together(accelerator):
        compute_dtype = strategy.autocast_dtype(accelerator)
        if cfg.lora.quantize != "none":
            model = quantized_base(cfg.model, cfg.lora.quantize, tokenizer, cfg.train.seed, accelerator.device,
                                   compute_dtype or torch.float32)
        else:
            model = build_model(cfg.model, tokenizer)  # all ranks at once: under ZeRO-3 building is collective
        # Evaluation always scores through the chunked head; training too, unless train.fused_loss=false.
        model = fuse_head_and_loss(model, training=cfg.train.fused_loss)
        if cfg.lora.enabled:
            model = apply_lora(model, cfg.lora, frozen_dtype=compute_dtype)
        checkpointing = None
        if cfg.model.gradient_checkpointing:
            checkpointing = strategy.enable_activation_checkpointing(accelerator, model)
        model = strategy.shard_before_optimizer(accelerator, model)
        if is_preset(cfg.model.name_or_path) and cfg.lora.quantize == "none":  # (a 4-bit base has its values)
            initialize_weights(model, cfg.train.seed, strategy.init_device(accelerator))
    memory.mark("model_built")
    max_steps = count_steps(cfg, len(train_set), accelerator.num_processes)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, max_steps, json_scheduler=strategy.json_scheduler(accelerator))
    train_loader = data.train_dataloader(train_set, cfg.train.micro_batch_size, tokenizer.pad_token_id,
                                         cfg.model.attn_implementation)
    eval_loader = data.eval_dataloader(eval_set, cfg.eval.micro_batch_size, tokenizer.pad_token_id)

    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler)
    strategy.register_comm_hook(model, cfg)  # DDP: ddp.comm_hook
    cfg.runtime = strategy.verify(accelerator, model, optimizer, cfg)  # stop here if not what was asked
    cfg.runtime.update(launch.launch_record())
    cfg.runtime.update(**cpu, max_steps=max_steps, data_format=",".join(sorted({p.format for p in train_parts})),
                       attn_implementation=accelerator.unwrap_model(model).config._attn_implementation,
                       activation_checkpointing=checkpointing, trainable_params=measure.trainable_numel(model),
                       param_dtypes=measure.parameter_dtypes(model), param_bytes=measure.parameter_bytes(model))
    # What MFU is computed from: the model's FLOPs per token and this device's peak.
    flops = {**measure.model_flops(accelerator.unwrap_model(model)),
             **measure.peak_flops(accelerator, cfg, cfg.runtime["mixed_precision"])}
    cfg.runtime.update(flops)

    if resume_from is not None:
        checkpoint.resume(accelerator, resume_from, quantized_base=cfg.lora.quantize != "none")  # all ranks
        accelerator.print(f"resumed from {resume_from} at step {state['step']}")
    if cpu:
        cfg.runtime.update(cpu_lib.allocator_for_the_loop(shards_parameters))
    memory.mark("prepared")
    cfg.runtime["memory_at_start_gb"] = memory.per_rank(accelerator)  # all ranks
    with job.stop_together(accelerator):
        if accelerator.is_main_process:
            if resume_from is not None:
                for moved in checkpoint.set_aside_newer(resume_from, out):
                    print(f"moved {moved.name}, newer than the resumed checkpoint, to {moved.parent}")
            config_lib.save(cfg, out / "config.yaml")
            console.write_to(out / "train.log")
            for records in ("metrics.jsonl", "samples.jsonl"):  # steps after the checkpoint are redone
                telemetry.trim_metrics(out / records, state["step"])

    prepared = Prepared(model, optimizer, scheduler, train_loader, eval_loader, tokenizer, max_steps, flops)
    finished = train(cfg, accelerator, prepared, state, stop, resume_from)
    best = checkpoint.step_dir(out, state["best_step"]) if state["best_step"] is not None else None
    telemetry.add_to_summary(accelerator, out, best_checkpoint=str(best) if best and best.is_dir() else None)
    if finished:
        measure.reset_peak_memory()
        card = model_card(cfg, state["step"], out / "metrics.jsonl", adapter=cfg.lora.enabled)
        export.export_model(accelerator, model, tokenizer, out / "final", state["step"], card,  # all ranks
                            merge_lora=cfg.lora.merge, dtype=cfg.checkpoint.export_dtype,
                            max_shard_size=cfg.checkpoint.max_shard_size)
        telemetry.add_to_summary(accelerator, out, export_peak_mem_gb_per_rank=measure.peak_per_rank(accelerator))
        accelerator.print(f"saved {out / 'final'}")
    accelerator.wait_for_everyone()
    accelerator.end_training()


@dataclass
class Prepared:
    """What the loop trains with: built by `run` and passed through `accelerator.prepare`."""
    model: Any
    optimizer: Any
    scheduler: Any
    train_loader: Any
    eval_loader: Any
    tokenizer: Any
    max_steps: int
    flops: dict  # what MFU is computed from (measure.model_flops and peak_flops)


def train(cfg: RunConfig, accelerator, prepared: Prepared, state: dict, stop, resumed_from: Path | None = None) -> bool:
    """THE loop. One optimizer step = `grad_accum_steps` micro-batches on every rank. Returns
    False when a signal stopped it early (after saving a checkpoint to resume from).

    The host reads values back from the device only on steps that log or save (and, under fp16,
    the loss scaler's verdict): on a GPU the CPU queues the next step while this one computes."""
    import torch

    from . import checkpoint
    from .guard import StepGuard
    from .measure import compute_dtype_probe, optimizer_stats
    from .telemetry import Telemetry

    model, optimizer, scheduler, max_steps = prepared.model, prepared.optimizer, prepared.scheduler, prepared.max_steps
    telemetry = Telemetry(accelerator, cfg, max_steps, prepared.flops, start_step=state["step"])
    guard = StepGuard(accelerator, optimizer, cfg.train.min_loss_scale)
    batches = micro_batches(accelerator, prepared.train_loader, state)
    last_saved = resumed_from
    tokens = torch.zeros((), dtype=torch.int64, device=accelerator.device)  # trained on since the last read
    compute_dtype = compute_dtype_probe(model)
    # The best held-out loss so far, in the trainer state: checkpoints carry it, so a resumed run
    # keeps the best checkpoint and counts early stopping's patience on.
    for key, value in {"best_eval_loss": None, "best_step": None, "evals_since_best": 0}.items():
        state.setdefault(key, value)
    if cfg.eval.every and state["step"] == 0:  # the baseline that fine-tuning is measured against
        run_evaluation(cfg, accelerator, model, prepared.eval_loader, prepared.tokenizer, telemetry, state, step=0)
    model.train()
    while state["step"] < max_steps:
        telemetry.step_begins()
        window = [next(batches) for _ in range(cfg.train.grad_accum_steps)]
        # Read before backward: a DeepSpeed-owned schedule advances inside the last backward.
        lr = scheduler.get_last_lr()[0]
        # The step's loss is (sum of token losses over all micro-batches on all ranks) / (their
        # number of target tokens), so count the window's targets first (docs/training-loop.md);
        # the collator counted each batch's on the host.
        window_targets = accelerator.reduce(
            torch.tensor(sum(batch.pop("num_targets") for batch in window), device=accelerator.device), "sum")
        step_loss = torch.zeros((), device=accelerator.device)
        # Bytes the strategy's collectives send are counted here: forward, backward, and DeepSpeed's
        # step, which accelerator.backward runs; the loop's own small reductions are left out.
        with telemetry.comm:
            for batch in window:
                with accelerator.accumulate(model):
                    loss = model(**batch, num_items_in_batch=window_targets).loss
                    step_loss += loss.detach()
                    # DDP/FSDP/DeepSpeed average gradients over ranks and accelerate/DeepSpeed divide the
                    # loss by the accumulation steps; both would turn our sum into a mean of means.
                    accelerator.backward(loss * accelerator.num_processes * accelerator.gradient_accumulation_steps)
                telemetry.count_batch(batch)  # this rank's tokens; summed over ranks when the step is logged
        step_loss = accelerator.reduce(step_loss, "sum")  # the step's loss, on every rank

        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm or math.inf)
        # The optimizer steps unless the loss scaler (fp16) or a non-finite loss or norm says not to;
        # see guard.py. Under DeepSpeed, accelerator.backward has already stepped the engine.
        if guard.step(optimizer, step_loss, grad_norm):
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        tokens += window_targets
        telemetry.advance()

        step = state["step"]
        # All ranks vote at the same steps: they must agree on where to stop.
        preempted = step < max_steps and step % cfg.train.stop_check_every == 0 and stop.requested(accelerator)
        saving = preempted or bool(cfg.checkpoint.every and step % cfg.checkpoint.every == 0)
        logging = step % cfg.train.log_every == 0 or step == max_steps
        if saving or logging:
            health = guard.read()
            state["tokens"] += int(tokens)
            tokens.zero_()
            if logging:
                telemetry.log({"step": step, "loss": step_loss.item(), "lr": lr, "grad_norm": _item(grad_norm),
                               "tokens": state["tokens"], "epoch": state["epoch"], **compute_dtype,
                               **optimizer_stats(optimizer), **telemetry.throughput(),
                               **telemetry.communication(), **guard.scale_record(),
                               **({"skipped": True} if health["skipped"] else {})})
            if health["bad_in_a_row"] >= cfg.train.max_bad_steps:
                telemetry.close()
                raise UserError(diverged(step, health, guard, last_saved))
        if (cfg.eval.every and step % cfg.eval.every == 0) or step == max_steps:
            run_evaluation(cfg, accelerator, model, prepared.eval_loader, prepared.tokenizer, telemetry, state, step)
            model.train()
        # Never checkpoint right after a bad step: the last checkpoint must stay a good one.
        if saving and health["healthy"]:
            keep = [resumed_from] if resumed_from else []
            if cfg.checkpoint.keep_best and state["best_step"] is not None:
                keep.append(checkpoint.step_dir(cfg.output_dir, state["best_step"]))
            last_saved = checkpoint.save(accelerator, cfg, dict(state), keep=tuple(keep),  # all ranks
                                         tokenizer=prepared.tokenizer)
            telemetry.log({"step": step, "checkpoint": str(last_saved)})
        patience = cfg.train.early_stopping_patience
        if patience and state["evals_since_best"] >= patience and step < max_steps:  # the same on every rank
            accelerator.print(f"early stopping at step {step}: the held-out loss has not improved for {patience} "
                              f"evaluations since step {state['best_step']} ({state['best_eval_loss']:.4f})")
            break
        if preempted:
            accelerator.print(f"stopped by signal after step {step}; resume=auto continues from {last_saved}")
            telemetry.close()
            return False
    telemetry.close()
    return True


def diverged(step: int, health: dict, guard, last_saved: Path | None) -> str:
    kept = f"the last good checkpoint is {last_saved}" if last_saved else "no checkpoint was saved"
    if not guard.scales:
        what, fix = "loss or gradient not finite", "lower optim.lr or raise optim.warmup_steps"
    elif health["loss_is_finite"]:
        what = f"fp16 gradients overflowing with the loss scale at its floor ({guard.min_loss_scale:g})"
        fix = "lower optim.lr or train.min_loss_scale, or train in bf16"
    else:
        what, fix = "loss not finite", "lower optim.lr, raise optim.warmup_steps or train in bf16"
    return (f"step {step}: {what} for {health['bad_in_a_row']} steps in a row (each skipped); {kept}: {fix}, "
            "then resume from it")


def run_evaluation(cfg: RunConfig, accelerator, model, eval_loader, tokenizer, telemetry, state: dict,
                   step: int) -> None:
    """All ranks: evaluate, generate the samples, log, and note in `state` whether the held-out loss
    is the best so far (every rank gets the same metrics, so they agree on the best and on stopping early)."""
    import torch

    from .validation import evaluate_model, generate, sample_prompts

    # On a fork of the RNG: the held-out loader's start draws from it, and training's dropout must
    # not depend on whether (or where, before a checkpoint) an evaluation ran.
    with torch.random.fork_rng(devices=[]):
        metrics = evaluate_model(model, eval_loader, accelerator, max_batches=cfg.eval.max_batches)  # all ranks
        prompts = sample_prompts(cfg.eval.sample_prompts)
        completions = generate(accelerator, model, tokenizer, prompts, cfg.eval.sample_max_new_tokens)  # all ranks
    telemetry.log({"step": step, **{f"eval_{k}": v for k, v in metrics.items()}})
    if prompts:
        telemetry.log_samples(step, dict(zip(prompts, completions)))
    if state["best_eval_loss"] is None or metrics["loss"] < state["best_eval_loss"]:
        state.update(best_eval_loss=metrics["loss"], best_step=step, evals_since_best=0)
    else:
        state["evals_since_best"] += 1


def micro_batches(accelerator, loader, state: dict):
    """Endless micro-batches, epoch after epoch, starting at `state`'s data position (epoch and
    batches already taken in it), which it keeps current so a checkpoint can resume exactly here."""
    import itertools

    import torch

    while True:
        loader.set_epoch(state["epoch"])  # the seedable sampler shuffles by seed + epoch
        # Starting an epoch draws from the global RNG (DataLoader's _base_seed, accelerate's skipping
        # loader), at another point of the stream in a resumed run than in the uninterrupted one, and
        # dropout would differ from there on: it starts on a fork of the RNG, so starting draws nothing.
        with torch.random.fork_rng(devices=[]):
            epoch_batches = iter(accelerator.skip_first_batches(loader, state["batch"]) if state["batch"] else loader)
            first = list(itertools.islice(epoch_batches, 1))
        for batch in itertools.chain(first, epoch_batches):
            state["batch"] += 1
            yield batch
        state["epoch"] += 1
        state["batch"] = 0


def count_steps(cfg: RunConfig, num_sequences: int, num_processes: int) -> int:
    if cfg.train.max_steps:
        return cfg.train.max_steps
    global_batch = cfg.train.global_batch_size(num_processes)
    steps = int(cfg.train.epochs * (num_sequences // (cfg.train.micro_batch_size * num_processes))
                // cfg.train.grad_accum_steps)
    if steps == 0:
        raise UserError(f"{num_sequences} training sequences make no full optimizer step of {global_batch} "
                        "(micro x accumulation x processes): lower train.micro_batch_size or give more data")
    return steps


def claim_output_dir(cfg: RunConfig):
    """Main process, before any work: lock output_dir for this run (a job.OutputLock), or fail if it
    can't be written, another run holds it, or it holds a run we were not told to resume."""
    from . import job

    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} is a file: choose a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = job.OutputLock(out)
    except OSError as e:
        raise UserError(f"output_dir {out} is not writable ({e.strerror}): choose another output_dir") from None
    if cfg.resume == "none" and any((out / name).exists() for name in ("metrics.jsonl", "checkpoints", "final")):
        lock.release()
        raise UserError(f"output_dir {out} already holds a run: continue it with resume=auto, "
                        "or choose a new output_dir")
    return lock


def _item(value) -> float | None:
    return None if value is None else float(value)


if __name__ == "__main__":
    run_cli(main)
