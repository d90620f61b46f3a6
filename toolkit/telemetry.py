"""What a run reports: metrics.jsonl, accelerate trackers, a progress bar, throughput and memory.

Only the main process writes; every method is safe to call on every rank.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm


class Telemetry:
    def __init__(self, accelerator, output_dir: str | Path, max_steps: int, start_step: int = 0):
        self.accelerator = accelerator
        self.is_main = accelerator.is_main_process
        self.path = Path(output_dir) / "metrics.jsonl"
        self.bar = tqdm(total=max_steps, initial=start_step, disable=not self.is_main, desc="train",
                        dynamic_ncols=True, file=sys.stdout)
        self.window_start = time.perf_counter()
        self.window_tokens = 0
        self.evals: list[dict] = []

    def count_tokens(self, n: int) -> None:
        self.window_tokens += n

    def throughput(self) -> dict:
        """Tokens per second (all ranks, input tokens incl. padding) since the last call."""
        now = time.perf_counter()
        rate = self.window_tokens / max(now - self.window_start, 1e-9)
        self.window_start, self.window_tokens = now, 0
        return {"tokens_per_s": round(rate, 1), "peak_mem_gb": round(peak_memory_gb(), 3)}

    def log(self, record: dict) -> None:
        if not self.is_main:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.accelerator.log({k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))},
                             step=record["step"])
        if "loss" in record:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", refresh=False)
        if "eval_loss" in record:
            self.evals.append(record)
            self.bar.write(f"step {record['step']}: eval_loss {record['eval_loss']:.4f} "
                           f"eval_perplexity {record['eval_perplexity']:.3f}")

    def advance(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def close(self) -> None:
        self.bar.close()
        if len(self.evals) > 1:
            first, last = self.evals[0], self.evals[-1]
            print(f"held-out perplexity {first['eval_perplexity']:.2f} at step {first['step']} -> "
                  f"{last['eval_perplexity']:.2f} at step {last['step']}")


def peak_memory_gb() -> float:
    """Peak accelerator memory of this process, or its peak resident memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
