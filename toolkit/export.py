"""Turn a resumable checkpoint of any strategy into a Hugging Face model directory, offline:
`python -m toolkit.export --checkpoint RUN/checkpoints/step-000200 --out DIR` (one process, no GPU).

Training already writes `final/` this way at the end; this is for the checkpoints in between.
The checkpoint's layout tells which strategy wrote it (`checkpoint.layout`); its shards are
consolidated on CPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import checkpoint
from .config import UserError, run_cli


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="toolkit.export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a checkpoints/step-N directory of any strategy")
    parser.add_argument("--out", required=True, help="directory to write the Hugging Face model to")
    parser.add_argument("--merge-lora", action="store_true", help="also write OUT/merged/ for a LoRA run")
    parser.add_argument("--dtype", choices=sorted(checkpoint.EXPORT_DTYPES),
                        help="dtype of the written weights (default: the run's checkpoint.export_dtype, fp32)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} exists and is not empty: choose a new directory")
    model, tokenizer, cfg = checkpoint.load_model(args.checkpoint)
    checkpoint.write_hf_model(model, model.state_dict(), tokenizer, out, merge_lora=args.merge_lora or cfg.lora.merge,
                              dtype=args.dtype or cfg.checkpoint.export_dtype)
    print(f"exported {args.checkpoint} -> {out}")


if __name__ == "__main__":
    run_cli(main)
