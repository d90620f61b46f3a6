"""Turn a resumable checkpoint of any strategy into a Hugging Face model directory, offline:
`python -m toolkit.export --checkpoint RUN/checkpoints/step-000200 --out DIR` (one process, no GPU).

Training already writes `final/` this way at the end; this is for the checkpoints in between.
The checkpoint layout tells the strategy: DeepSpeed (`pytorch_model/` ZeRO shards), FSDP
(`pytorch_model_fsdp_0/` distributed-checkpoint shards) or DDP/single (`model.safetensors`).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from . import checkpoint, config as config_lib
from .config import UserError, run_cli
from .model import apply_lora, build_model, build_tokenizer


def consolidated_state_dict(step_dir: Path) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of the trained module, gathered from whatever shards it was saved in."""
    if (step_dir / "pytorch_model" / "offloaded_tensors").is_dir():
        raise UserError(f"{step_dir} was saved with NVMe offload: its fp32 weights sit in DeepSpeed swap files that "
                        "zero_to_fp32 cannot read; use the run's final/, or evaluate the checkpoint under the same "
                        "zero3_nvme launch")
    if (step_dir / "pytorch_model").is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        return get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag="pytorch_model")
    if (step_dir / "pytorch_model_fsdp_0").is_dir():
        from accelerate.utils import merge_fsdp_weights
        with tempfile.TemporaryDirectory() as tmp:
            merge_fsdp_weights(str(step_dir / "pytorch_model_fsdp_0"), tmp, safe_serialization=True)
            return load_file(Path(tmp) / "model.safetensors")
    if (step_dir / "model.safetensors").is_file():
        return load_file(step_dir / "model.safetensors")
    raise UserError(f"{step_dir} has no model weights in a layout the toolkit writes "
                    "(model.safetensors, pytorch_model/ or pytorch_model_fsdp_0/): point to a checkpoints/step-N folder")


def load_checkpoint_model(step_dir: str | Path):
    """(model, tokenizer, run config) rebuilt on CPU from a resumable checkpoint of any strategy."""
    step_dir = Path(step_dir)
    if not (step_dir / checkpoint.STATE_FILE).is_file() or not (step_dir / "config.yaml").is_file():
        raise UserError(f"{step_dir} is not a complete toolkit checkpoint (no {checkpoint.STATE_FILE} or config.yaml)")
    cfg = config_lib.load(step_dir / "config.yaml")
    run_dir = step_dir.parent.parent
    tokenizer = build_tokenizer(cfg.model, cache_dir=run_dir / "tokenizer")
    model = build_model(cfg.model, tokenizer)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    state_dict = consolidated_state_dict(step_dir)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    tied = {"lm_head.weight", "base_model.model.lm_head.weight"}  # saved once, as the input embedding
    if unexpected or set(missing) - tied:
        raise UserError(f"{step_dir} does not match its config's model: missing {sorted(set(missing) - tied)[:3]}, "
                        f"unexpected {unexpected[:3]}")
    model.tie_weights()
    return model, tokenizer, cfg


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="toolkit.export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a checkpoints/step-N directory of any strategy")
    parser.add_argument("--out", required=True, help="directory to write the Hugging Face model to")
    parser.add_argument("--merge-lora", action="store_true", help="also write OUT/merged/ for a LoRA run")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} exists and is not empty: choose a new directory")
    model, tokenizer, cfg = load_checkpoint_model(args.checkpoint)
    checkpoint.write_hf_model(model, model.state_dict(), tokenizer, out, merge_lora=args.merge_lora or cfg.lora.merge)
    print(f"exported {args.checkpoint} -> {out}")


if __name__ == "__main__":
    run_cli(main)
