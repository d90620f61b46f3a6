"""Held-out evaluation that every rank runs: training calls it, and so does `toolkit.evaluate`.

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
