"""torch.compile against eager for the toolkit's training step, one process, opt-125m's shapes.

    PYTHONPATH=. python benchmarks/compile.py [--threads 2] [--steps 4]

The step the toolkit runs (fused head + loss, fused AdamW, fp32) on random-opt-125m with micro batch
8 x 128 tokens, eager and with every decoder layer compiled as torchtitan does it (`torch.compile`
per block, so a graph break or recompilation stays inside one layer), the two models stepping in
turns on the same batches. Prints the median seconds per step after the first (which compiles) and
the largest relative difference of their losses (the same initial weights, no dropout). The toolkit has no
`train.compile` key because this measures compiled slower on CPU (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from transformers import OPTConfig, OPTForCausalLM

from toolkit.config import OptimConfig
from toolkit.loss import fuse_head_and_loss
from toolkit.model import PRESETS
from toolkit.optim import build_optimizer


def build(compiled: bool):
    """random-opt-125m without dropout (so both runs compute the same losses), its step as the toolkit's."""
    torch.manual_seed(0)
    no_dropout = dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    model = fuse_head_and_loss(OPTForCausalLM(OPTConfig(**PRESETS["random-opt-125m"], **no_dropout)).train())
    if compiled:
        for layer in model.model.decoder.layers:
            layer.compile()
    return model, build_optimizer(model, OptimConfig())


def step(model, optimizer, ids) -> tuple[float, float]:
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start, loss.item()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="timed steps after one of warm-up (and compiling)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    runs = {"eager": build(False), "compiled": build(True)}
    seconds, losses = {name: [] for name in runs}, {name: [] for name in runs}
    for _ in range(args.steps + 1):
        ids = torch.randint(4, 50000, (8, 128), generator=generator)
        for name, (model, optimizer) in runs.items():  # alternated, step by step
            took, loss = step(model, optimizer, ids)
            seconds[name].append(took)
            losses[name].append(loss)
    eager, compiled = (statistics.median(seconds[name][1:]) for name in runs)
    worst = max(abs(a - b) / a for a, b in zip(losses["eager"], losses["compiled"]))
    print(f"eager: {eager:.2f} s/step; compiled: {compiled:.2f} s/step ({compiled / eager:.3f}x; first step, "
          f"compiling: {seconds['compiled'][0]:.1f} s); losses differ by {worst:.1e} relative at most")


if __name__ == "__main__":
    main()
