"""Shared fixtures: small data sets built offline, and a runner for `accelerate launch`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = ROOT / "accelerate_configs"


@pytest.fixture(scope="session")
def text_data(tmp_path_factory) -> Path:
    """~400 real English documents (standard library docstrings): enough for a tokenizer and 12 steps."""
    from toolkit.demo_data import stdlib_docs

    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    docs = [d for _, d in zip(range(400), stdlib_docs())]
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


@pytest.fixture(scope="session")
def sft_data(tmp_path_factory) -> Path:
    from toolkit.demo_data import sft_tasks

    path = tmp_path_factory.mktemp("data") / "sft.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in sft_tasks(n=600, seed=1)))
    return path


def tiny_run(data: Path, output_dir: Path, **overrides) -> list[str]:
    """Overrides for a fast, deterministic fp32 run of tiny-opt (no dropout)."""
    base = {
        "model.name_or_path": "tiny-opt", "data.train": str(data), "data.block_size": 64,
        "data.eval_fraction": 0.05, "train.micro_batch_size": 4, "train.grad_accum_steps": 1,
        "train.max_steps": 4, "train.seed": 7, "optim.lr": 1e-3, "optim.scheduler": "constant",
        "optim.warmup_steps": 0, "eval.micro_batch_size": 4, "eval.max_batches": 3,
        "output_dir": str(output_dir),
    }
    base.update(overrides)
    return [f"{k}={v}" for k, v in base.items()]


def launch(module: str, args: list[str], config: str | None = "single", extra: list[str] = (),
           check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file accelerate_configs/<config>.yaml -m <module> args` (config
    may also be a path without .yaml)
    (or plain `python -m` when config is None); output is kept for the failure message."""
    if config is None:
        cmd = [sys.executable, "-m", module, *args]
    else:
        path = Path(config).with_suffix(".yaml") if "/" in config else ACCELERATE_CONFIGS / f"{config}.yaml"
        # a free port per launch: the default 29500 may still be held by the previous run's store
        port = [] if "--machine_rank" in extra else ["--main_process_port", str(free_port())]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path), *port, *extra,
               "-m", module, *args]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(output_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training records, evaluation records) of a run's metrics.jsonl."""
    records = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r], [r for r in records if "eval_loss" in r]


def runtime(output_dir: Path) -> dict:
    import yaml

    return yaml.safe_load((Path(output_dir) / "config.yaml").read_text())["runtime"]
