"""Memory savings of the toolkit's features, measured in one process on the real OPT shapes.

    python benchmarks/memory.py [--preset random-opt-125m] [--batch 2] [--seq 256]

- optimizer state: bytes held by AdamW vs bitsandbytes 8-bit AdamW after one step
  (toolkit.measure.optimizer_state_size, the number training logs as optim_state_mb);
- activations: bytes autograd saves for backward in one forward, with and without activation
  checkpointing, counted exactly with saved-tensor hooks (not a noisy allocator peak).
Writes a markdown table to stdout; results are kept in benchmarks/RESULTS.md.
"""

import argparse
import time

import torch

from toolkit.config import OptimConfig
from toolkit.model import preset_model
from toolkit.optim import build_optimizer
from toolkit.measure import optimizer_state_size


def build(preset: str):
    return preset_model(preset)


def saved_activation_bytes(model, ids) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return total


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="random-opt-125m")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    ids = torch.randint(4, 50000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))

    rows = []
    state = {}
    for name in ("adamw", "adamw_8bit"):
        model = build(args.preset)
        optimizer = build_optimizer(model, OptimConfig(name=name))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        state[name] = optimizer_state_size(optimizer)[1]
        del model, optimizer
    rows.append(("optimizer state", "AdamW", state["adamw"], "AdamW 8-bit", state["adamw_8bit"]))

    acts = {}
    for checkpointing in (False, True):
        model = build(args.preset)
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        start = time.perf_counter()
        acts[checkpointing] = (saved_activation_bytes(model, ids), time.perf_counter() - start)
        del model
    rows.append(("activations saved for backward", "plain", acts[False][0], "checkpointed", acts[True][0]))

    print(f"{args.preset}, batch {args.batch} x {args.seq} tokens, fp32, CPU\n")
    print("| what | baseline | MiB | with | MiB | ratio |\n|---|---|---|---|---|---|")
    for what, a, a_bytes, b, b_bytes in rows:
        print(f"| {what} | {a} | {a_bytes / 2**20:.1f} | {b} | {b_bytes / 2**20:.1f} | {b_bytes / a_bytes:.3f} |")
    print(f"\nforward+backward time: plain {acts[False][1]:.2f} s, checkpointed {acts[True][1]:.2f} s "
          f"(ratio {acts[True][1] / acts[False][1]:.2f}: the recomputation)")


if __name__ == "__main__":
    main()
