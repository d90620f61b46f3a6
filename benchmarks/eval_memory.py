"""Peak memory of held-out evaluation against a training step, on the real OPT shapes, with windows
as long as the model allows (2048 positions for every real OPT).

    PYTHONPATH=. python benchmarks/eval_memory.py [--preset random-opt-125m] [--seq 2048]

Each measurement runs in a process of its own: the model is built, the peak resident set size
(VmHWM) is reset, then one phase runs and its peak is read:
- train: one optimizer step (fused head + loss, fused AdamW) at micro batch 1 x seq;
- eval: evaluation of a batch of `--eval-batch` windows of seq tokens through the toolkit's
  chunked head (toolkit.validation.evaluate_model), and, for comparison, the same scores from
  transformers' full fp32 logits and a log-softmax over them, as evaluation computed them before.
Prints a markdown table (kept in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from types import SimpleNamespace

PHASES = ("train", "eval_chunked", "eval_full_logits")


def measure(phase: str, preset: str, seq: int, eval_batch: int) -> dict:
    import torch

    from toolkit.config import OptimConfig
    from toolkit.loss import fuse_head_and_loss
    from toolkit.model import preset_model
    from toolkit.optim import build_optimizer
    from toolkit.cpu import use_cpu_share
    from toolkit.measure import memory_now_gb, peak_memory_gb, reset_peak_memory
    from toolkit.validation import evaluate_model

    use_cpu_share()
    model = fuse_head_and_loss(preset_model(preset))
    generator = torch.Generator().manual_seed(0)
    batch_size = 1 if phase == "train" else eval_batch
    ids = torch.randint(4, 50000, (batch_size, seq), generator=generator)
    baseline = memory_now_gb()
    reset_peak_memory()
    if phase == "train":
        optimizer = build_optimizer(model, OptimConfig())
        model.train()
        model(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(seq - 1)).loss.backward()
        optimizer.step()
    elif phase == "eval_chunked":
        evaluate_model(model, [{"input_ids": ids, "labels": ids}], SimpleNamespace(gather_for_metrics=lambda t: t))
    else:
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            torch.stack([nll.sum(1), (logits.argmax(-1) == ids[:, 1:]).sum(1).float()], 1)  # the per-example stats
    return {"phase": phase, "batch": batch_size, "model_gb": round(baseline, 3), "peak_gb": round(peak_memory_gb(), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="random-opt-125m")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--eval-batch", type=int, default=8, help="held-out windows per forward (eval.micro_batch_size)")
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)  # one measurement, in this process
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(measure(args.phase, args.preset, args.seq, args.eval_batch)))
        return
    rows = []
    for phase in PHASES:
        out = subprocess.run([sys.executable, __file__, "--phase", phase, "--preset", args.preset, "--seq",
                              str(args.seq), "--eval-batch", str(args.eval_batch)],
                             capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    train = rows[0]["peak_gb"] - rows[0]["model_gb"]
    print(f"{args.preset}, {args.seq}-token windows, fp32, CPU: peak resident memory above the built model\n")
    print("| phase | batch | model GB | peak GB | above the model GB | vs training |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        above = r["peak_gb"] - r["model_gb"]
        print(f"| {r['phase']} | {r['batch']} x {args.seq} | {r['model_gb']:.2f} | {r['peak_gb']:.2f} | {above:.2f} | "
              f"{above / train:.2f} |")


if __name__ == "__main__":
    main()
