"""What `accelerate launch` asked for, read from the environment it sets in every process: the one
reader of those variables (standard library only, so CLIs read it before any heavy import)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .config import UserError


@dataclass
class Requested:
    """The strategy `accelerate launch` asked for, read from the environment it sets."""
    kind: str  # single | ddp | fsdp | deepspeed
    world_size: int
    # Sizes from a `parallelism_config` section (dp_replicate, dp_shard, tp, cp, sp); {} without one.
    mesh: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_env(cls) -> "Requested":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        mesh = {dim: int(os.environ.get(f"PARALLELISM_CONFIG_{dim.upper()}_SIZE", "1"))
                for dim in ("dp_replicate", "dp_shard", "tp", "cp", "sp")
                } if _env_flag("ACCELERATE_USE_PARALLELISM_CONFIG") else {}
        if _env_flag("ACCELERATE_USE_DEEPSPEED"):
            return cls("deepspeed", world, mesh)
        if _env_flag("ACCELERATE_USE_FSDP"):
            return cls("fsdp", world, mesh)
        return cls("ddp" if world > 1 else "single", world, mesh)

    def refuse_model_parallelism(self) -> None:
        """Only data parallelism runs (DDP, ZeRO, FSDP, HSDP's dp_replicate x dp_shard): tensor, context
        and sequence parallel sizes are refused before any process group or model exists. (A tensor-
        parallel plan for OPT trained, but accelerate's save_state fails on its DTensors: README,
        known limits.)"""
        beyond = {dim: size for dim, size in self.mesh.items()
                  if dim not in ("dp_replicate", "dp_shard") and size > 1}
        if beyond:
            sizes = ", ".join(f"{dim}_size={size}" for dim, size in beyond.items())
            raise UserError(f"the accelerate config asks for {sizes}, but this toolkit runs data parallelism only "
                            "(tensor, context and sequence parallelism are not supported): set those sizes to 1 "
                            "in its parallelism_config")

    @staticmethod
    def offload() -> tuple[str, str] | None:
        """(optimizer, param) offload devices of the DeepSpeed config asked for; None if not DeepSpeed."""
        if not _env_flag("ACCELERATE_USE_DEEPSPEED"):
            return None
        path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
        if path == "none":  # answered inline in `accelerate config`
            return tuple(os.environ.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{k}_DEVICE", "none")
                         for k in ("OPTIMIZER", "PARAM"))
        zero = json.loads(Path(path).read_text()).get("zero_optimization", {})
        return tuple((zero.get(f"offload_{k}") or {}).get("device", "none") for k in ("optimizer", "param"))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")
