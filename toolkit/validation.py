"""Held-out evaluation and sample generations that every rank runs: training calls them, and so
does `toolkit.evaluate`.

Perplexity is exp(sum NLL / sum scored tokens) over all ranks, each held-out example counted
exactly once (`gather_for_metrics` drops the duplicates that even out the last batch). The model
scores through the chunked head of loss.py (`fuse_head_and_loss`), so evaluation never holds a
[batch, sequence, vocab] logits tensor.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import torch


METRIC_DIR = Path(__file__).parent / "metrics" / "language_modeling"
STAT_FIELDS = ("nll", "tokens", "correct", "n_bytes", "documents")


def load_metric():
    # By local path: hub metric names need the Hub. A unique id per call keeps concurrent
    # processes and evaluations from sharing evaluate's cache files.
    import evaluate

    return evaluate.load(str(METRIC_DIR), keep_in_memory=True, experiment_id=uuid.uuid4().hex)


@torch.no_grad()
def evaluate_model(model, loader, accelerator, max_batches: int = 0) -> dict:
    """Every rank calls this (under ZeRO-3 and FSDP each forward needs all ranks). `model` went
    through `loss.fuse_head_and_loss`.

    Each rank scores its share of the loader; `gather_for_metrics` collects the per-example sums
    and drops the duplicates accelerate adds to even out the last batch, so every held-out
    example counts exactly once whatever the number of processes."""
    model.eval()
    metric = load_metric()
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            # A prepared loader left mid-epoch would stay registered as accelerate's active one.
            if hasattr(loader, "end"):
                loader.end()
            break
        stats = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"],
                      return_example_stats=True)
        counts = [batch[k].double() if k in batch else torch.zeros_like(stats[:, 0]) for k in ("n_bytes", "documents")]
        stats = accelerator.gather_for_metrics(torch.cat([stats, torch.stack(counts, 1)], 1)).cpu()
        metric.add_batch(nll=stats[:, 0].tolist(),
                         **{name: stats[:, j].long().tolist() for j, name in enumerate(STAT_FIELDS) if j})
    return metric.compute()


def sample_prompts(setting: str | list[str] | None) -> list[str]:
    """eval.sample_prompts: a list, or a .txt file of one prompt per line (blank lines skipped)."""
    if isinstance(setting, str):
        return [line for line in Path(setting).read_text().splitlines() if line.strip()]
    return setting or []


@torch.no_grad()
def generate(accelerator, model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy completions. Every rank generates: under ZeRO-3/FSDP each forward gathers shards from
    all ranks, and synced_gpus keeps every rank stepping until the longest one is done. With a chat
    template (a run on chat data saves one) each prompt is a user turn, as the model was trained."""
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.eval()
    completions = []
    for prompt in prompts:
        if tokenizer.chat_template:
            inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                   return_dict=True, return_tensors="pt")
        else:
            inputs = tokenizer(prompt, return_tensors="pt")
        inputs = inputs.to(accelerator.device)
        out = unwrapped.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 synced_gpus=accelerator.num_processes > 1, pad_token_id=tokenizer.pad_token_id)
        completions.append(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return completions
