"""Checkpoints: the one module that knows their layouts. Save, find and resume training state;
load a checkpoint's model (for evaluation and export.py).

A resumable checkpoint `checkpoints/step-000200/` is `accelerator.save_state` (model, optimizer,
scheduler, RNG; in the strategy's own layout) plus the toolkit's `trainer_state.json` (step,
data position), the run's `config.yaml` and its `tokenizer/`. It is written to `step-000200.tmp/`
and published (files.publish_dir) only once complete and on disk, so a crash, even of the machine,
never leaves a half-written checkpoint that looks complete.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

from . import config as config_lib, job
from .config import RunConfig, UserError
from .files import publish_dir, scratch_dir, tmp_name

STATE_FILE = "trainer_state.json"
STEP_DIR = re.compile(r"^step-(\d+)$")
# What a resumed run must share with the checkpoint: anything else would silently train another
# model or another data order. (Step counts, cadences, evaluation and output settings may change.)
# The packing and the data's field names change what the saved data position counts.
MUST_MATCH = ("model.name_or_path", "model.revision", "data.train", "data.weights", "data.chat_template", "data.eval",
              "data.eval_fraction",
              "data.block_size", "data.format", "data.split", "data.packing", "data.text_field",
              "data.prompt_field", "data.response_field", "train.seed", "optim.name", "lora.enabled", "lora.r",
              "lora.alpha", "lora.target_modules")


def step_dir(output_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of optimizer step `step` is published."""
    return Path(output_dir) / "checkpoints" / f"step-{step:06d}"


def checkpoint_dirs(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (`*.tmp` leftovers of a crash are not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def layout(path: Path) -> str:
    """Which strategy wrote a resumable checkpoint, from the files `save_state` leaves:
    deepspeed (ZeRO shards in pytorch_model/), fsdp (distributed-checkpoint shards) or full."""
    if (path / "pytorch_model").is_dir():
        return "deepspeed"
    if (path / "pytorch_model_fsdp_0").is_dir():
        return "fsdp"
    if (path / "model.safetensors").is_file():
        return "full"
    raise UserError(f"{path} holds no model weights in a layout the toolkit writes (model.safetensors, "
                    "pytorch_model/ or pytorch_model_fsdp_0/): it is incomplete; pick another checkpoint")


# --- saving and resuming ------------------------------------------------------------------------


def save(accelerator, cfg: RunConfig, trainer_state: dict, keep: tuple[Path, ...] = (), tokenizer=None) -> Path:
    """All ranks (save_state gathers or writes shards on every rank). Keeps the newest
    `checkpoint.keep_last`, never those in `keep` (the one this run resumed from, the best). With
    `tokenizer` the checkpoint carries it, so it can be evaluated or exported wherever it is copied."""
    final = step_dir(cfg.output_dir, trainer_state["step"])
    root = final.parent
    tmp = tmp_name(final)
    failed = _save_failed(root, final)
    with job.stop_together(accelerator, failed):
        if accelerator.is_main_process:
            scratch_dir(final)
    with job.stop_together(accelerator, failed):  # ends once every rank has written its part
        accelerator.save_state(str(tmp))  # all ranks
    # Patient: deleting old checkpoints on a slow filesystem may take longer than train.collective_timeout.
    with job.stop_together(accelerator, failed, patient=True):
        if accelerator.is_main_process:
            # what the checkpoint is: its step, data position, and the ranks whose shards it holds
            state = {**trainer_state, "num_processes": accelerator.num_processes}
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
            config_lib.save(cfg, tmp / "config.yaml")
            if tokenizer is not None:
                from .model import save_tokenizer

                save_tokenizer(tokenizer, tmp / "tokenizer")
            publish_dir(tmp, final)  # the same step saved again after a resume is replaced whole
            if cfg.checkpoint.keep_last:
                kept = {p.resolve() for p in keep}
                for old in checkpoint_dirs(root)[:-cfg.checkpoint.keep_last]:
                    if old.resolve() not in kept:
                        shutil.rmtree(old)
    return final


def _save_failed(root: Path, final: Path):
    def message(error: Exception) -> str:
        earlier = [p.name for p in checkpoint_dirs(root) if p != final]
        kept = f"earlier checkpoints are intact (newest: {earlier[-1]})" if earlier else "no earlier checkpoint exists"
        return (f"could not write checkpoint {final} ({getattr(error, 'strerror', None) or error}); {kept}: "
                "free space or fix permissions, then resume=auto")
    return message


def find_resume(resume: str, output_dir: str | Path) -> Path | None:
    """The checkpoint `resume` points to: none -> None, auto -> newest in output_dir (or None)."""
    if resume == "none":
        return None
    if resume == "auto":
        found = checkpoint_dirs(Path(output_dir) / "checkpoints")
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file() or not (path / "config.yaml").is_file():
        raise UserError(f"resume={resume} is not a complete checkpoint (no {STATE_FILE} or config.yaml): "
                        "point it to a checkpoints/step-N directory, or use resume=auto")
    return path


def check_resume(path: Path, cfg: RunConfig, num_processes: int, running_layout: str) -> dict:
    """Before any state is loaded: the checkpoint's trainer state, its data position mapped to this
    run. Refuses what would silently train something else: another model or data, another global
    batch, or a sharded optimizer state saved by another number of ranks."""
    saved = config_lib.load(path / "config.yaml")
    changed = [f"{key} {config_lib.get(saved, key)!r} -> {config_lib.get(cfg, key)!r}"
               for key in MUST_MATCH if config_lib.get(saved, key) != config_lib.get(cfg, key)]
    state = json.loads((path / STATE_FILE).read_text())
    # (checkpoints of earlier toolkit versions have it in their config's runtime only)
    saved_procs = state.pop("num_processes", None) or saved.runtime.get("num_processes", num_processes)
    saved_global = saved.train.global_batch_size(saved_procs)
    if saved_global != cfg.train.global_batch_size(num_processes):
        changed.append(f"global batch {saved_global} -> {cfg.train.global_batch_size(num_processes)} "
                       "(micro_batch_size x grad_accum_steps x processes)")
    if changed:
        raise UserError(f"cannot resume {path}: the run differs from it in {'; '.join(changed)}: "
                        "resume with the checkpoint's settings, or start a new output_dir")
    saved_layout = layout(path)
    if saved_procs != num_processes and saved_layout != "full":
        raise UserError(f"cannot resume {path} on {num_processes} processes: it was saved by {saved_procs} "
                        f"{saved_layout} ranks, whose sharded optimizer state only that many can load: launch "
                        f"with --num_processes {saved_procs}")
    if saved_layout != running_layout:
        raise UserError(f"cannot resume {path} under this strategy: it holds {saved_layout} state; launch with the "
                        "accelerate config it was trained with (or export it and start a new run from the export)")
    # The same global batch is the same consecutive samples of the seeded order per step, however
    # it is split, so the position maps by samples seen (exact, also for a new micro batch).
    samples = state["batch"] * saved.train.micro_batch_size * saved_procs
    state["batch"] = samples // (cfg.train.micro_batch_size * num_processes)
    return state


def resume(accelerator, path: Path, quantized_base: bool = False) -> None:
    """All ranks: restore model, optimizer, scheduler and RNG from `path`.

    A QLoRA checkpoint also holds bitsandbytes' quantization state of the 4-bit base (absmax,
    quant_map, ... per weight), which a model's `load_state_dict` does not take: the base is frozen
    and rebuilt the same at every start, so those keys are left unread (the adapters, which train,
    are loaded as always; the QLoRA resume test fails if they were not)."""
    accelerator.load_state(str(path), **({"strict": False} if quantized_base else {}))  # (DeepSpeed takes no strict)
    if (path / "pytorch_model" / "offloaded_tensors").is_dir():  # saved with NVMe optimizer offload
        from .strategy import zero

        zero.restore_swapped_optimizer_state(accelerator.deepspeed_engine_wrapped.engine, path / "pytorch_model",
                                             accelerator.process_index)


def set_aside_newer(path: Path, output_dir: str | Path) -> list[Path]:
    """After resuming an older checkpoint of this run, move the newer ones (an abandoned future) to
    checkpoints/abandoned-<time>/, so resume=auto can never jump back to them. Main process."""
    root = Path(output_dir) / "checkpoints"
    if path.resolve().parent != root.resolve():
        return []
    step = int(STEP_DIR.match(path.name).group(1))
    newer = [p for p in checkpoint_dirs(root) if int(STEP_DIR.match(p.name).group(1)) > step]
    if newer:
        aside = root / f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}"
        aside.mkdir()
        for p in newer:
            p.rename(aside / p.name)
    return newer


# --- a checkpoint's model -----------------------------------------------------------------------


def run_model(step_dir: Path, empty: bool = False):
    """(untrained model, tokenizer, run config) as the run that wrote `step_dir` built them; with
    `empty`, the same modules on the meta device (no weights: a skeleton to name and export the
    checkpoint's weights by). A 4-bit base is always built: its packed weights need their state."""
    from .model import apply_lora, build_tokenizer, initial_model, model_config

    if not (step_dir / STATE_FILE).is_file() or not (step_dir / "config.yaml").is_file():
        raise UserError(f"{step_dir} is not a complete toolkit checkpoint (no {STATE_FILE} or config.yaml)")
    cfg = config_lib.load(step_dir / "config.yaml")
    if (step_dir / "tokenizer").is_dir():  # the checkpoint's own: it loads wherever the checkpoint was copied
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(step_dir / "tokenizer")
    else:  # an older checkpoint: presets kept their trained tokenizer in runs/x/tokenizer/, hub models load by id
        tokenizer = build_tokenizer(cfg.model, cache_dir=step_dir.parent.parent / "tokenizer")
    if empty and cfg.lora.quantize == "none":
        import torch
        from transformers import OPTForCausalLM

        with torch.device("meta"):
            model = OPTForCausalLM(model_config(cfg.model, tokenizer))
            model = apply_lora(model, cfg.lora) if cfg.lora.enabled else model
        return model, tokenizer, cfg
    model = initial_model(cfg.model, tokenizer, cfg.train.seed)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    return model, tokenizer, cfg


def trained_weights(step_dir: Path, names: list[str]):
    """(name, whole fp32 tensor) of the trained module for each of `names` (the run's parameter
    names: the order also names NVMe swap files), read from whatever shards `step_dir` holds one
    parameter at a time, never as a whole state dict: each reader maps its files (DeepSpeed's
    zero_to_fp32 maps the optimizer files; only ZeRO-1/2's fp32 partitions are joined in memory, by
    zero_to_fp32) and the caller gets one parameter at a time."""
    kind = layout(step_dir)
    if kind == "deepspeed":
        if (step_dir / "pytorch_model" / "offloaded_tensors").is_dir():
            lazy = _nvme_state_dict(step_dir / "pytorch_model", names)
        else:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
            lazy = get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag="pytorch_model", lazy_mode=True)
        stored, read = lazy.keys(), lambda name: lazy[name].contiguous()  # (ZeRO-3's pseudo tensors gather here)
    elif kind == "fsdp":
        stored, read = _dcp_reader(step_dir / "pytorch_model_fsdp_0")
    else:
        from safetensors import safe_open

        weights = safe_open(step_dir / "model.safetensors", framework="pt")
        stored, read = weights.keys(), weights.get_tensor
    missing = [name for name in names if name not in stored]
    if missing:
        raise UserError(f"{step_dir} does not match its model: no {missing[:3]}: was it written by another toolkit "
                        "version or for another model?")
    for name in names:
        yield name, read(name)


def _dcp_reader(path: Path):
    """(names, read) for an FSDP distributed checkpoint (accelerate saves {"model": state dict}):
    read(name) loads that one tensor, whole, from the ranks' files. Written by hand because
    accelerate's merge_fsdp_weights loads the whole state dict at once."""
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(str(path))
    stored = {key.removeprefix("model."): meta for key, meta in reader.read_metadata().state_dict_metadata.items()}

    def read(name: str):
        tensor = torch.empty(stored[name].size, dtype=stored[name].properties.dtype)
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({"model": {name: tensor}}, storage_reader=reader, no_dist=True)
        return tensor

    return stored.keys(), read


def _nvme_state_dict(saved: Path, parameter_order: list[str]) -> dict:
    """A ZeRO-3 checkpoint saved with NVMe optimizer offload as zero_to_fp32's lazy state dict
    (pseudo tensors that gather a parameter when asked). Its fp32 partitions are not in the
    optimizer files (DeepSpeed leaves them empty there) but in each rank's swap files,
    offloaded_tensors/rank<r>/<first>_<last>.tensor.swp per optimizer sub-group, named by the ZeRO
    ids of the sub-group's first and last parameter (their positions in the model's parameter
    order); each file holds the rank's partition, padded for aligned I/O, and is mapped read-only.
    Written by hand because zero_to_fp32 does not read swap files; the consolidation is its own."""
    import math
    import warnings

    import numpy as np
    import torch
    from deepspeed.utils import zero_to_fp32

    model_states = zero_to_fp32.parse_model_states(zero_to_fp32.get_model_state_files(str(saved)))
    optim_files = zero_to_fp32.get_optim_files(str(saved))
    world_size = len(optim_files)
    # the optimizer files hold the sub-groups too small to swap (under 1 MiB per rank, in memory
    # during training), e.g. a model's last few parameters; the swapped ones are empty there
    in_files = zero_to_fp32.parse_optim_states(optim_files, str(saved))[2]
    ranks = sorted((saved / "offloaded_tensors").iterdir(), key=lambda folder: int(folder.name.removeprefix("rank")))
    if len(ranks) != world_size:
        raise UserError(f"{saved.parent} has swap files of {len(ranks)} ranks for {world_size} optimizer files: "
                        "the checkpoint is incomplete; pick another one")
    zero_id = {name: i for i, name in enumerate(parameter_order)}
    flat_groups = [[] for _ in ranks]
    for index, sub_group in enumerate(model_states[0].param_shapes):  # the sub-groups, in the files' order
        names = list(sub_group)
        numel = sum(math.ceil(shape.numel() / world_size) for shape in sub_group.values())
        for rank, folder in enumerate(ranks):
            if in_files[rank][index].numel() >= numel:
                flat_groups[rank].append(in_files[rank][index][:numel])
                continue
            path = folder / f"{zero_id.get(names[0])}_{zero_id.get(names[-1])}.tensor.swp"
            if not path.is_file() or path.stat().st_size < numel * 4:
                raise UserError(f"{path} is missing or short: {saved.parent} is not a complete NVMe checkpoint of "
                                "this model; pick another checkpoint")
            with warnings.catch_warnings():  # torch warns that the mapping is read-only: it is only read
                warnings.simplefilter("ignore", UserWarning)
                flat_groups[rank].append(torch.from_numpy(np.memmap(path, np.float32, "r", shape=(numel,))))
    return zero_to_fp32._get_fp32_state_dict_from_zero3_checkpoint(
        world_size, flat_groups, model_states, exclude_frozen_parameters=False)


def load_weights(model, step_dir: Path) -> None:
    """The trained weights of `step_dir` into `model` (the run's untrained model), one parameter at a time."""
    import torch

    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in trained_weights(step_dir, list(parameters)):
            if parameters[name].shape != tensor.shape:
                raise UserError(f"{step_dir} does not match its model: {name} is {tuple(tensor.shape)}, the model's "
                                f"{tuple(parameters[name].shape)}: was it written for another model?")
            parameters[name].copy_(tensor)


def load_model(step_dir: str | Path):
    """(trained model, tokenizer, run config) on CPU from a resumable checkpoint of any strategy."""
    step_dir = Path(step_dir)
    model, tokenizer, cfg = run_model(step_dir)
    load_weights(model, step_dir)
    return model, tokenizer, cfg


def load_sharded_weights(accelerator, model, step_dir: Path) -> None:
    """After `prepare`, all ranks, under the strategy that wrote `step_dir`: each rank reads its own
    part, so no rank ever holds the whole model (weights only, any number of processes)."""
    if layout(step_dir) == "deepspeed":
        # DeepSpeed rebuilds the fp32 weights from all ZeRO shards; optimizer states would need
        # the saving world size.
        accelerator.load_state(str(step_dir), load_optimizer_states=False, load_lr_scheduler_states=False)
    else:
        from accelerate.utils import load_fsdp_model

        # The model part of load_state: its optimizer part needs the run's optimizer.
        load_fsdp_model(accelerator.state.fsdp_plugin, accelerator, model, str(step_dir))
