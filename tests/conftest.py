"""Shared fixtures: small data sets built offline, a tiny OPT, a stand-in accelerator, and a runner
for `accelerate launch`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
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


def tiny_opt(**overrides):
    """The tiny-opt preset with transformers' random init, seed 0 (the same weights every call)."""
    from toolkit.model import preset_model

    return preset_model("tiny-opt", seed=0, **overrides)


def fake_accelerator(**fields):
    """Enough of an Accelerator for code that runs on one process: the main one, on the CPU, not
    distributed; `save_state` writes a weights file, `gather_for_metrics` is the identity. `fields`
    override or add attributes (distributed_type, state, ...)."""
    from types import SimpleNamespace

    import torch
    from accelerate.utils import DistributedType

    base = dict(is_main_process=True, num_processes=1, device=torch.device("cpu"), distributed_type=DistributedType.NO,
                save_state=lambda d: (Path(d) / "model.safetensors").write_text("w"), gather_for_metrics=lambda t: t)
    return SimpleNamespace(**{**base, **fields})


def in_a_process_group_of_one(code: str) -> str:
    """Run `code` in a fresh process that has started a gloo (DeepSpeed) process group of one rank,
    so this test process never has one; returns what it printed."""
    setup = f"""
        import os
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="{free_port()}", RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
        import deepspeed, torch
        deepspeed.init_distributed(dist_backend="gloo")
    """
    # ended as a launched rank ends (config.exit_process): the teardown around gloo's threads aborted
    # this process once in CI, after it had printed everything
    ending = "from toolkit.config import exit_process\nexit_process(0)\n"
    script = textwrap.dedent(setup) + textwrap.dedent(code) + ending
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT,
                          env=environment(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


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


_distributed_test = False


def pytest_runtest_setup(item):
    """Remember whether the test about to run (and the fixtures it sets up) may start 2 processes."""
    global _distributed_test
    _distributed_test = item.get_closest_marker("distributed") is not None


def command(module: str, args: list[str], config: str | None = "single", extra: list[str] = ()) -> list[str]:
    """`accelerate launch --config_file accelerate_configs/<config>.yaml -m <module> args` (config
    may also be a path without .yaml), or plain `python -m` when config is None."""
    if config is None:
        return [sys.executable, "-m", module, *args]
    path = Path(config).with_suffix(".yaml") if "/" in config else ACCELERATE_CONFIGS / f"{config}.yaml"
    if not _distributed_test and (yaml_processes(path) > 1 or "--num_processes" in extra):
        raise AssertionError(f"{path.name} starts several processes: mark the test @pytest.mark.distributed")
    # a free port per launch: the default 29500 may still be held by the previous run's store
    port = [] if "--machine_rank" in extra else ["--main_process_port", str(free_port())]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path), *port, *extra,
            "-m", module, *args]


def yaml_processes(path: Path) -> int:
    import yaml

    return int(yaml.safe_load(path.read_text()).get("num_processes", 1))


def environment(**extra) -> dict:
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **extra}


def launch(module: str, args: list[str], config: str | None = "single", extra: list[str] = (),
           check: bool = True, timeout: int = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command to the end; output is kept for the failure message."""
    cmd = command(module, args, config, extra)
    proc = subprocess.run(cmd, cwd=ROOT, env=environment(**(env or {})), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def jemalloc_library() -> str:
    """The jemalloc a CPU launch may preload (`LD_PRELOAD`, docs/strategies.md); CI must have it."""
    import ctypes.util

    found = ctypes.util.find_library("jemalloc")
    if not found:
        if os.environ.get("CI"):
            pytest.fail("libjemalloc2 is not installed: `make setup` installs it as root")  # a set-up bug in CI
        pytest.skip("libjemalloc2 is not installed (apt install libjemalloc2)")
    return found


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


class Job:
    """A command running in the background, in a session of its own. Every process it starts
    carries a tag in its environment, so the test can find (and finally kill) all of them: torch's
    launcher puts its workers in sessions of their own, out of reach of a process-group kill."""

    def __init__(self, module: str, args: list[str], config: str | None = "single", extra: list[str] = ()):
        self.tag = uuid.uuid4().hex
        # Output to files, not pipes: nobody reads a pipe while the job runs, and a full one blocks it.
        self.stdout, self.stderr = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(command(module, args, config, extra), cwd=ROOT, text=True,
                                     env=environment(TOOLKIT_TEST_JOB=self.tag), start_new_session=True,
                                     stdout=self.stdout, stderr=self.stderr)

    def pids(self) -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and f"TOOLKIT_TEST_JOB={self.tag}".encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:  # gone meanwhile, or not ours to read
                pass
        return found

    def workers(self) -> list[int]:
        """The training processes (those with a RANK), by rank."""
        ranks = {}
        for pid in self.pids():
            try:
                env = dict(item.split("=", 1) for item in
                           Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
            except OSError:
                continue
            if "RANK" in env and pid != self.proc.pid:
                ranks[int(env["RANK"])] = pid
        return [ranks[r] for r in sorted(ranks)]

    def wait_for(self, condition, timeout: float = 300, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                _, out, err = self.finish()
                raise AssertionError(f"job ended ({self.proc.returncode}) before {what}:\n{out[-2000:]}\n{err[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout} s")
            time.sleep(0.05)

    def finish(self, timeout: float = 300) -> tuple[int, str, str]:
        """(exit status, stdout, stderr) once the launcher has exited."""
        self.proc.wait(timeout=timeout)
        return self.proc.returncode, *(self._read(f) for f in (self.stdout, self.stderr))

    @staticmethod
    def _read(f) -> str:
        f.seek(0)
        return f.read()

    def kill_all(self) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def logged_steps(output_dir: Path) -> list[int]:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in record:
            steps.append(record["step"])
    return steps
