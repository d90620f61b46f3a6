"""The toolkit's training step against a variant of it, one process, opt-125m's shapes.

    PYTHONPATH=. python benchmarks/step.py --variant compiled [--threads 2] [--steps 4]
    PYTHONPATH=. python benchmarks/step.py --variant unfused-head

The step the toolkit runs (fused head + loss, fused AdamW, clipping at 1.0, fp32) on random-opt-125m
with micro batch 8 x 128 tokens, against:
- compiled: every decoder layer compiled as torchtitan does it (`torch.compile` per block, so a
  graph break or recompilation stays inside one layer);
- unfused-head: transformers' own head and loss (fp32 logits of every position, their
  log-softmax and gradient), i.e. the step without toolkit/loss.py.
The two models step in turns on the same batches, with glibc keeping freed blocks as the toolkit
has it on CPU. Prints the median seconds per step after the first (which compiles) and the largest
relative difference of their losses (the same initial weights, no dropout).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from toolkit.config import OptimConfig
from toolkit.cpu import tune_cpu_allocator
from toolkit.loss import fuse_head_and_loss
from toolkit.model import preset_model
from toolkit.optim import build_optimizer


def build(variant: str):
    """random-opt-125m without dropout (so both compute the same losses), as the toolkit builds it or as the variant."""
    model = preset_model("random-opt-125m", dropout=0.0, attention_dropout=0.0, activation_dropout=0.0).train()
    if variant != "unfused-head":
        model = fuse_head_and_loss(model)
    if variant == "compiled":
        for layer in model.model.decoder.layers:
            layer.compile()
    return model, build_optimizer(model, OptimConfig())


def step(model, optimizer, ids) -> tuple[float, float]:
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start, loss.item()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=("compiled", "unfused-head"), required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="timed steps after one of warm-up (and compiling)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tune_cpu_allocator(shards_parameters=False)  # glibc as the toolkit sets it for one process
    generator = torch.Generator().manual_seed(0)
    runs = {"toolkit": build("toolkit"), args.variant: build(args.variant)}
    seconds, losses = {name: [] for name in runs}, {name: [] for name in runs}
    for _ in range(args.steps + 1):
        ids = torch.randint(4, 50000, (8, 128), generator=generator)
        for name, (model, optimizer) in runs.items():  # alternated, step by step
            took, loss = step(model, optimizer, ids)
            seconds[name].append(took)
            losses[name].append(loss)
    ours, theirs = (statistics.median(seconds[name][1:]) for name in runs)
    worst = max(abs(a - b) / a for a, b in zip(losses["toolkit"], losses[args.variant]))
    print(f"toolkit: {ours:.2f} s/step; {args.variant}: {theirs:.2f} s/step ({theirs / ours:.3f}x; first step: "
          f"{seconds[args.variant][0]:.1f} s); losses differ by {worst:.1e} relative at most")


if __name__ == "__main__":
    main()
