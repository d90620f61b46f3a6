"""Hugging Face model directories from a trained model, whatever the strategy: `final/` at the end of
training, and offline from a resumable checkpoint of any strategy (ZeRO and FSDP shards, NVMe swap
files; one process, no GPU):

    python -m toolkit.export --checkpoint RUN/checkpoints/step-000200 --out DIR [--dtype bf16] [--merge-lora]

The directory holds safetensors shards (with Hugging Face's index), config, tokenizer, a model card
(README.md) and export_info.json; a LoRA run's holds the adapter, and with merging also merged/, a
full model. At the end of training all ranks gather the weights one parameter at a time
(`export_model`), so no rank ever holds the whole model; offline, the checkpoint's shards are read
one parameter at a time into a model skeleton without weights (`checkpoint.trained_weights`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .config import CheckpointConfig, UserError, check_size, run_cli
from .files import replaced_dir

EXPORT_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# What an exported directory is, beside the Hugging Face files: the optimizer step it was trained to.
INFO_FILE = "export_info.json"


def export_model(accelerator, model, tokenizer, out: str | Path, step: int, card: str, merge_lora: bool = False,
                 dtype: str = "fp32", max_shard_size: str = CheckpointConfig.max_shard_size) -> None:
    """Write `out` as a Hugging Face model directory, whatever the strategy. All ranks: the weights
    are gathered one parameter at a time and written by the main process as shards fill, so no
    process holds more than a shard of the model beyond what it trains with."""
    from .strategy import full_weights

    unwrapped = accelerator.unwrap_model(model)
    names = None
    if is_lora(unwrapped) and not merge_lora:  # an adapter alone: the frozen base is not gathered
        names = {name for name, _ in unwrapped.named_parameters() if "lora_" in name}
    weights = full_weights(accelerator, model, names)  # every rank drives it to the end, in step
    if accelerator.is_main_process:
        write_hf_model(unwrapped, weights, tokenizer, Path(out), step, card, merge_lora, dtype, max_shard_size)
    else:
        for _ in weights:
            pass
    accelerator.wait_for_everyone()


def write_hf_model(model, weights, tokenizer, out: Path, step: int, card: str, merge_lora: bool = False,
                   dtype: str = "fp32", max_shard_size: str = CheckpointConfig.max_shard_size) -> None:
    """safetensors weights + config + tokenizer that plain transformers loads, from `weights` ((name,
    whole tensor) pairs, consumed once); for a LoRA model the adapter, and with `merge_lora` also
    `merged/`, a full model. The same files under every strategy: floats in `dtype` (fp32, bf16 or
    fp16), no second copy of a tied weight, shards of at most `max_shard_size` with Hugging Face's
    index; `card` is its README.md (card.model_card). INFO_FILE records the optimizer `step`."""
    from .model import save_tokenizer

    with replaced_dir(out) as tmp:
        if is_lora(model):
            adapter = {}
            weights = _noting_adapter(weights, adapter)
            if merge_lora:
                write_weights(tmp / "merged", model.get_base_model(), merged_weights(model, weights), dtype,
                              max_shard_size)
                save_tokenizer(tokenizer, tmp / "merged")
            for _ in weights:  # what merging left (nothing) or, for an adapter alone, all of it
                pass
            # peft writes adapter_config.json and picks the adapter's tensors out of a state dict by name
            model.save_pretrained(tmp, state_dict=_cast(adapter, dtype), safe_serialization=True)
        else:
            write_weights(tmp, model, weights, dtype, max_shard_size)
        save_tokenizer(tokenizer, tmp)
        (tmp / "README.md").write_text(card)  # (replaces peft's template for an adapter)
        (tmp / INFO_FILE).write_text(json.dumps({"step": step}) + "\n")


def is_lora(model) -> bool:
    return hasattr(model, "peft_config")


def _noting_adapter(weights, adapter: dict):
    """`weights` passed on, the adapter's (small) tensors also kept in `adapter`."""
    for name, tensor in weights:
        if "lora_" in name:
            adapter[name] = tensor
        yield name, tensor


def write_weights(directory: Path, model, weights, dtype: str, max_shard_size: str) -> None:
    """config.json, generation_config.json and the weights of a full transformers `model` in
    safetensors files named as `save_pretrained` names them. Written by hand because
    `save_pretrained` takes a whole state dict: here each shard is written as soon as it fills."""
    from accelerate.utils import convert_file_size_to_int
    from safetensors.torch import save_file

    directory.mkdir(exist_ok=True)
    torch_dtype = _torch_dtype(dtype)
    limit = convert_file_size_to_int(max_shard_size)
    # Tied weights (the lm_head) are the embedding: loading ties them again.
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    shards, shard, size, total = [], {}, 0, 0

    def write_shard():
        shards.append((directory / f"shard-{len(shards)}.safetensors", list(shard)))
        save_file(shard, shards[-1][0], metadata={"format": "pt"})
        shard.clear()

    for name, tensor in weights:
        if name in tied:
            continue
        tensor = _in_dtype(tensor, torch_dtype).contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > limit:
            write_shard()
            size = 0
        shard[name] = tensor
        size, total = size + nbytes, total + nbytes
    write_shard()
    _name_shards(directory, shards, total)

    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(directory)
    _record_dtype(directory, dtype)  # the files', not the live model's
    if model.can_generate() and model.generation_config is not None:
        model.generation_config.save_pretrained(directory)


def _name_shards(directory: Path, shards: list, total_size: int) -> None:
    """One shard is model.safetensors; several are model-0000i-of-0000n.safetensors, with
    model.safetensors.index.json saying which file holds each weight (what from_pretrained reads)."""
    if len(shards) == 1:
        shards[0][0].rename(directory / "model.safetensors")
        return
    weight_map = {}
    for i, (path, names) in enumerate(shards, 1):
        path.rename(directory / f"model-{i:05d}-of-{len(shards):05d}.safetensors")
        weight_map.update(dict.fromkeys(names, f"model-{i:05d}-of-{len(shards):05d}.safetensors"))
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def merged_weights(peft_model, weights):
    """(name, tensor) of the base model with each adapter folded into its layer's weight, named as the
    base model names them, from the LoRA model's stream. Written by hand because peft's
    `merge_and_unload` merges a whole model in place: here one layer at a time, as its base weight and
    its adapter pass (the update as peft computes it, B @ A x scaling)."""
    from peft.utils import transpose

    base = peft_model.get_base_model()
    adapter = peft_model.active_adapter
    # QLoRA: bitsandbytes' packed 4-bit weights, each with the state that turns it back into floats
    quant_states = {f"{name}.weight": module.weight.quant_state for name, module in base.named_modules()
                    if getattr(getattr(module, "weight", None), "quant_state", None) is not None}
    waiting = {}  # layer -> its base weight and adapter matrices seen so far
    for name, tensor in weights:
        name = name.removeprefix("base_model.model.")
        if name in quant_states:
            from bitsandbytes.functional import dequantize_4bit

            tensor = dequantize_4bit(tensor, quant_states[name])
        layer, part = _lora_part(name)
        if part is None or part == "bias":
            yield (name if part is None else f"{layer}.bias"), tensor
            continue
        parts = waiting.setdefault(layer, {})
        parts[part] = tensor
        if len(parts) == 3:
            del waiting[layer]
            lora = base.get_submodule(layer)
            delta = transpose(parts["B"].float() @ parts["A"].float(), lora.fan_in_fan_out) * lora.scaling[adapter]
            yield f"{layer}.weight", parts["weight"].float() + delta


def _lora_part(name: str) -> tuple[str, str | None]:
    """`layer.base_layer.weight` -> (layer, "weight"), `layer.lora_A.<adapter>.weight` -> (layer, "A"),
    any other name -> (name, None)."""
    if ".base_layer." in name:
        layer, leaf = name.split(".base_layer.")
        return layer, leaf
    if ".lora_" in name:
        layer, rest = name.split(".lora_")
        return layer, rest[0]
    return name, None


def _torch_dtype(dtype: str):
    import torch

    return getattr(torch, EXPORT_DTYPES[dtype])


def _in_dtype(tensor, torch_dtype):
    """Floats in the export's dtype; integer tensors as they are."""
    return tensor.to(torch_dtype) if tensor.is_floating_point() else tensor


def _cast(state_dict: dict, dtype: str) -> dict:
    torch_dtype = _torch_dtype(dtype)
    return {k: _in_dtype(v, torch_dtype) for k, v in state_dict.items()}


def _record_dtype(directory: Path, dtype: str) -> None:
    config = directory / "config.json"
    fields = json.loads(config.read_text())
    fields["dtype"] = EXPORT_DTYPES[dtype]
    fields.pop("quantization_config", None)  # a QLoRA base's: the files hold full-precision weights
    config.write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="toolkit.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoints/step-N directory of any strategy")
    parser.add_argument("--out", required=True, help="directory to write the Hugging Face model to")
    parser.add_argument("--merge-lora", action="store_true", help="also write OUT/merged/ for a LoRA run")
    parser.add_argument("--dtype", choices=sorted(EXPORT_DTYPES),
                        help="dtype of the written weights (default: the run's checkpoint.export_dtype, fp32)")
    parser.add_argument("--max-shard-size",
                        help="largest safetensors file, e.g. 500MB (default: the run's checkpoint.max_shard_size)")
    args = parser.parse_args(argv)
    if args.max_shard_size:
        check_size("--max-shard-size", args.max_shard_size)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} exists and is not empty: choose a new directory")
    from . import checkpoint  # (imports torch: after the arguments, so --help answers at once)
    from .card import model_card

    step_dir = Path(args.checkpoint)
    model, tokenizer, cfg = checkpoint.run_model(step_dir, empty=True)  # names the weights; holds none
    if any(p.is_meta for p in model.parameters()):
        weights = checkpoint.trained_weights(step_dir, [name for name, _ in model.named_parameters()])
    else:  # a 4-bit base, built whole: its packed weights need their quantization state
        checkpoint.load_weights(model, step_dir)
        weights = model.named_parameters()
    step = json.loads((step_dir / checkpoint.STATE_FILE).read_text())["step"]
    card = model_card(cfg, step, step_dir.parent.parent / "metrics.jsonl", adapter=cfg.lora.enabled)
    write_hf_model(model, weights, tokenizer, out, step, card,
                   merge_lora=args.merge_lora or cfg.lora.merge,
                   dtype=args.dtype or cfg.checkpoint.export_dtype,
                   max_shard_size=args.max_shard_size or cfg.checkpoint.max_shard_size)
    print(f"exported {args.checkpoint} -> {out}")


if __name__ == "__main__":
    run_cli(main)
