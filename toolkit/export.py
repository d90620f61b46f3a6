"""Hugging Face model directories from a trained model: `final/` at the end of training
(`export_model`, all ranks, whatever the strategy), and from a resumable checkpoint of any strategy,
offline: `python -m toolkit.export --checkpoint RUN/checkpoints/step-000200 --out DIR` (one process,
no GPU). The checkpoint's layout tells which strategy wrote it (`checkpoint.layout`); its shards
are consolidated on CPU. LoRA runs write the adapter, and with `merge` a merged full model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import checkpoint
from .config import UserError, run_cli
from .files import replaced_dir

EXPORT_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# What an exported directory is, beside the Hugging Face files: the optimizer step it was trained to.
INFO_FILE = "export_info.json"


def export_model(accelerator, model, tokenizer, out: str | Path, step: int, merge_lora: bool = False,
                 dtype: str = "fp32") -> None:
    """Write `out` as a Hugging Face model directory, whatever the strategy.

    All ranks call this: the full state dict of the master weights is gathered on the main process
    only (the naive `save_pretrained` of a sharded model writes empty tensors)."""
    from .strategy import master_state_dict

    state_dict = master_state_dict(accelerator, model)  # all ranks
    if accelerator.is_main_process:
        write_hf_model(accelerator.unwrap_model(model), state_dict, tokenizer, Path(out), step, merge_lora, dtype)
    accelerator.wait_for_everyone()


def write_hf_model(model, state_dict: dict, tokenizer, out: Path, step: int, merge_lora: bool = False,
                   dtype: str = "fp32") -> None:
    """safetensors weights + config + tokenizer that plain transformers loads; for a LoRA model the
    adapter (peft picks its weights out of the full state dict), and with `merge_lora` also
    `merged/`, a full model. The same files under every strategy: floats in `dtype` (fp32, bf16 or
    fp16) and no second copy of a tied weight. INFO_FILE records the optimizer `step`."""
    import torch

    torch_dtype = getattr(torch, EXPORT_DTYPES[dtype])
    # Gathered shards no longer share storage, so transformers' own check would keep the tied
    # lm_head as a second copy of the embedding (FSDP): drop it by name; loading ties it again.
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    weights = {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in state_dict.items() if k not in tied}
    with replaced_dir(out) as tmp:
        model.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
        _record_dtype(tmp, dtype)  # save_pretrained records the live model's dtype, not the files'
        tokenizer.save_pretrained(tmp)
        (tmp / INFO_FILE).write_text(json.dumps({"step": step}) + "\n")
        if merge_lora:
            merged = merged_model(model, state_dict, out).to(torch_dtype)
            merged.save_pretrained(tmp / "merged", safe_serialization=True)
            tokenizer.save_pretrained(tmp / "merged")


def _record_dtype(directory: Path, dtype: str) -> None:
    config = directory / "config.json"
    if config.is_file():
        fields = json.loads(config.read_text())
        fields["dtype"] = EXPORT_DTYPES[dtype]
        config.write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")


def merged_model(peft_model, state_dict: dict, source: Path):
    """A fresh full model on CPU with the LoRA weights folded in (the live one may be sharded, so
    it is rebuilt from the full state dict rather than merged in place)."""
    import copy

    from peft import get_peft_model
    from transformers import OPTForCausalLM

    base = OPTForCausalLM(copy.deepcopy(peft_model.base_model.model.config))
    fresh = get_peft_model(base, copy.deepcopy(peft_model.peft_config["default"]))
    checkpoint.load_weights(fresh, {k: v.float().cpu() for k, v in state_dict.items()}, source)
    return fresh.merge_and_unload()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="toolkit.export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a checkpoints/step-N directory of any strategy")
    parser.add_argument("--out", required=True, help="directory to write the Hugging Face model to")
    parser.add_argument("--merge-lora", action="store_true", help="also write OUT/merged/ for a LoRA run")
    parser.add_argument("--dtype", choices=sorted(EXPORT_DTYPES),
                        help="dtype of the written weights (default: the run's checkpoint.export_dtype, fp32)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} exists and is not empty: choose a new directory")
    model, tokenizer, cfg = checkpoint.load_model(args.checkpoint)
    step = json.loads((Path(args.checkpoint) / checkpoint.STATE_FILE).read_text())["step"]
    write_hf_model(model, model.state_dict(), tokenizer, out, step, merge_lora=args.merge_lora or cfg.lora.merge,
                   dtype=args.dtype or cfg.checkpoint.export_dtype)
    print(f"exported {args.checkpoint} -> {out}")


if __name__ == "__main__":
    run_cli(main)
