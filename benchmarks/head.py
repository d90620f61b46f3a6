"""The fused LM head + loss alone (toolkit/loss.py) at opt-125m's shapes, by logits chunk size.

    PYTHONPATH=. python benchmarks/head.py --threads 1 --tokens 508 --chunk-mib 32 128

Forward + backward of one batch of scored positions, chunk sizes alternated (A B A B ...) so that
drift of the machine falls on all of them alike; the first round is warm-up. Prints the median
seconds per chunk size and the largest relative difference of the loss from the first size's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from toolkit import loss

VOCAB, HIDDEN = 50272, 768  # opt-125m's head


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=508, help="scored positions in the batch")
    parser.add_argument("--chunk-mib", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weight = (torch.randn(VOCAB, HIDDEN) * 0.02).requires_grad_()
    hidden = torch.randn(args.tokens, HIDDEN, requires_grad=True)
    targets = torch.randint(0, VOCAB, (args.tokens,))
    seconds, losses = {mib: [] for mib in args.chunk_mib}, {}
    for _ in range(args.rounds):
        for mib in args.chunk_mib:
            loss.CHUNK_BYTES = mib * 2**20
            weight.grad = hidden.grad = None
            start = time.perf_counter()
            value = loss.LinearCrossEntropy.apply(hidden, weight, targets, torch.float32)
            value.backward()
            seconds[mib].append(time.perf_counter() - start)
            losses[mib] = value.item()
    first = args.chunk_mib[0]
    for mib, times in seconds.items():
        print(f"{mib} MiB chunks: {statistics.median(times[1:]):.3f} s (median of {len(times) - 1}), "
              f"loss {abs(losses[mib] - losses[first]) / losses[first]:.1e} relative to {first} MiB's")


if __name__ == "__main__":
    main()
