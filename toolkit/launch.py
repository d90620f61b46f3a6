"""What `accelerate launch` asked for, read from the environment it sets in every process (the one
reader of those variables) and from its command line. Nothing heavy at import, so CLIs read it
before torch loads."""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

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
        kind = ("deepspeed" if _env_flag("ACCELERATE_USE_DEEPSPEED") else "fsdp" if _env_flag("ACCELERATE_USE_FSDP")
                else "ddp" if world > 1 else "single")
        return cls(kind, world, mesh)

    def refuse_a_smaller_world(self) -> None:
        """Every process, before any work: the world this process joined must be the one `accelerate
        launch` asked for. accelerate passes only the world its launcher starts (WORLD_SIZE); on several
        machines with a DeepSpeed config its default launcher (pdsh) starts a separate world on each
        machine when it has no hostfile, and each would train alone, on part of the global batch."""
        launched = launched_processes()
        if launched is None or self.world_size == launched:
            return
        raise UserError(
            f"`accelerate launch` asked for {launched} processes in all, but this process joined a world of "
            f"{self.world_size}: its launcher started a world of its own. With a DeepSpeed config on several "
            "machines pass `--deepspeed_multinode_launcher standard` (examples/slurm/train.sbatch does) or give "
            "DeepSpeed's launcher a --deepspeed_hostfile")

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


@functools.cache
def _launch_command():
    """(arguments after `launch`, accelerate's parse of them, the config file it reads) of the
    `accelerate launch` command this process runs under; None when no such command is among this
    process's ancestors (plain python, torchrun, srun) or accelerate's parser refuses it."""
    argv = _accelerate_launch_argv(os.getpid())
    if argv is None:
        return None
    from accelerate.commands.config import default_config_file
    from accelerate.commands.launch import launch_command_parser  # its own parser: every spelling of a flag

    try:
        args, _ = launch_command_parser().parse_known_args(argv)
    except SystemExit:  # a command line accelerate itself accepted; don't fail on a newer flag
        return None
    config_file = args.config_file or (default_config_file if Path(default_config_file).is_file() else None)
    return argv, args, config_file


def launched_processes() -> int | None:
    """The process count (all machines) of the `accelerate launch` command this process runs under:
    its command line, else its config file, else accelerate's default config; None without one."""
    command = _launch_command()
    if command is None:
        return None
    _, args, config_file = command
    if args.num_processes is not None:
        return int(args.num_processes)
    try:
        processes = (yaml.safe_load(Path(config_file).read_text()) or {}).get("num_processes") if config_file else None
    except (OSError, yaml.YAMLError):
        return None
    return int(processes) if processes is not None else None


def launch_record() -> dict:
    """What a run records of how it was started: the launch command (`accelerate launch ...`, else
    this process's own), the accelerate config file and the SHA-256 of its content, and the git
    commit of the toolkit's source when it runs from a checkout (with `+dirty` for local changes)."""
    import hashlib
    import shlex
    import subprocess
    import sys

    command = _launch_command()
    record = {"launch_command": "accelerate launch " + shlex.join(command[0]) if command
              else shlex.join([Path(sys.executable).name, *sys.argv])}
    config_file = command[2] if command else None
    if config_file and Path(config_file).is_file():
        record["accelerate_config"] = str(Path(config_file).resolve())
        record["accelerate_config_sha256"] = hashlib.sha256(Path(config_file).read_bytes()).hexdigest()
    source = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(source), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    if (source / ".git").exists():  # a checkout (an installed package has no commit of its own)
        try:
            dirty = git("status", "--porcelain", "--", "toolkit")
            record["git_commit"] = git("rev-parse", "HEAD") + ("+dirty" if dirty else "")
        except (OSError, subprocess.SubprocessError):  # no git on this machine
            pass
    return record


def _accelerate_launch_argv(pid: int) -> list[str] | None:
    """The arguments after `launch` of the nearest `accelerate launch` ancestor of `pid` (Linux /proc)."""
    while pid > 1:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat.rsplit(")", 1)[1].split()[1])  # the parent
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
        except (OSError, ValueError, IndexError):
            return None
        for i, arg in enumerate(argv[:4]):  # [python] .../accelerate launch | -m accelerate.commands.launch
            if (arg in ("accelerate.commands.launch", "accelerate-launch") or arg.endswith("/accelerate-launch")
                    or (arg == "launch" and i and argv[i - 1].endswith("accelerate"))):
                return argv[i + 1:]
    return None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")
