"""Resumable checkpoints and the final export.

A checkpoint is `accelerator.save_state` (model, optimizer, scheduler, RNG; whatever the strategy)
plus the toolkit's own `trainer_state.json` (step, data position) and the run's `config.yaml`.
It is written to `step-N.tmp/` and renamed to `step-N/` only once complete, so a crash never
leaves a half-written checkpoint that looks complete.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from . import config as config_lib
from .config import UserError

STATE_FILE = "trainer_state.json"
STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dirs(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def save(accelerator, output_dir: str | Path, cfg, trainer_state: dict, keep_last: int) -> Path:
    """All ranks call this (save_state gathers or writes shards on every rank)."""
    root = Path(output_dir) / "checkpoints"
    final = root / f"step-{trainer_state['step']:06d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crash while saving this very step
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))
        config_lib.save(cfg, tmp / "config.yaml")
        if final.exists():  # the same step saved again after a resume: replace it whole
            shutil.rmtree(final)
        tmp.rename(final)
        if keep_last:
            for old in checkpoint_dirs(root)[:-keep_last]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def find_resume(resume: str, output_dir: str | Path) -> Path | None:
    """The checkpoint `resume` points to: none -> None, auto -> newest in output_dir (or None)."""
    if resume == "none":
        return None
    if resume == "auto":
        found = checkpoint_dirs(Path(output_dir) / "checkpoints")
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise UserError(f"resume={resume} is not a complete checkpoint (no {STATE_FILE}): "
                        "point it to a checkpoints/step-N directory, or use resume=auto")
    return path


def load(accelerator, path: Path) -> dict:
    """Restore every rank's state from `path`; returns the toolkit's trainer state."""
    accelerator.load_state(str(path))
    if (path / "pytorch_model" / "offloaded_tensors").is_dir():
        accelerator.print(f"warning: {path} was saved with NVMe offload; DeepSpeed restores its optimizer state "
                          "only approximately (see README, Known limits)")
    return json.loads((path / STATE_FILE).read_text())


def export(accelerator, model, tokenizer, out: str | Path, merge_lora: bool = False) -> None:
    """Write `out` as a Hugging Face model directory, whatever the strategy.

    All ranks call this: `get_state_dict` gathers ZeRO-3 / FSDP shards into a full state dict on
    the main process (the naive `save_pretrained` of a sharded model writes empty tensors)."""
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        write_hf_model(accelerator.unwrap_model(model), state_dict, tokenizer, Path(out), merge_lora)
    accelerator.wait_for_everyone()


def write_hf_model(model, state_dict: dict, tokenizer, out: Path, merge_lora: bool = False) -> None:
    """safetensors weights + config + tokenizer that plain transformers loads; for a LoRA model the
    adapter (peft picks its weights out of the full state dict), and with `merge_lora` also
    `merged/`, a full model. Written beside `out` and renamed, so `out` is never half-written."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if merge_lora:
        merged_model(model, state_dict).save_pretrained(tmp / "merged", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "merged")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def merged_model(peft_model, state_dict: dict):
    """A fresh full model on CPU with the LoRA weights folded in (the live one may be sharded, so
    it is rebuilt from the full state dict rather than merged in place)."""
    import copy

    from peft import get_peft_model
    from transformers import OPTForCausalLM

    base = OPTForCausalLM(copy.deepcopy(peft_model.base_model.model.config))
    fresh = get_peft_model(base, copy.deepcopy(peft_model.peft_config["default"]))
    fresh.load_state_dict({k: v.float().cpu() for k, v in state_dict.items()}, strict=False)
    fresh.tie_weights()
    return fresh.merge_and_unload()
