"""Bad input under 2 processes (the DDP config): one `error:` line from the main process naming
the problem and the fix, a non-zero exit, no traceback through toolkit code, no rank left
running, and nothing in an existing output directory changed."""

import hashlib
import os

import pytest

from conftest import ROOT, Job, launch, tiny_run


@pytest.fixture(scope="module")
def existing_run(text_data, tmp_path_factory):
    """A finished run (no checkpoints, so resume=auto starts fresh): every bad launch below points
    at it with resume=auto, so only the error it is about can stop it."""
    out = tmp_path_factory.mktemp("existing")
    launch("toolkit.train", tiny_run(text_data, out, **{"train.max_steps": 1}), config=None)
    return out


def snapshot(directory) -> dict:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def cases(text_data, existing_run, tmp_path) -> dict:
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"text": "fine"}\n{"text": "fine too"}\n{"text": oops}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    incomplete = tmp_path / "checkpoints" / "step-000004"
    incomplete.mkdir(parents=True)
    into_existing = {"resume": "auto"}
    return {
        "missing --config": (["--config", str(tmp_path / "missing.yaml")],
                             "missing.yaml does not exist: pass an existing YAML file"),
        "missing data file": (tiny_run(tmp_path / "missing.jsonl", existing_run, **into_existing),
                              "missing.jsonl does not exist: check the path"),
        "malformed JSONL line": (tiny_run(bad_jsonl, existing_run, **into_existing),
                                 "bad.jsonl line 3 is not valid JSON"),
        "empty data file": (tiny_run(empty, existing_run, **into_existing), "empty.jsonl is empty"),
        "unknown key": (tiny_run(text_data, existing_run, **into_existing, **{"optim.lrr": 1}),
                        "unknown config key optim.lrr (did you mean optim.lr?)"),
        "wrong type": (tiny_run(text_data, existing_run, **into_existing, **{"train.max_steps": "many"}),
                       "train.max_steps must be int, got 'many'"),
        "block size too long": (tiny_run(text_data, existing_run, **into_existing, **{"data.block_size": 4096}),
                                "data.block_size=4096 is longer than the model allows (512 positions)"),
        "missing model directory": (tiny_run(text_data, existing_run, **into_existing,
                                             **{"model.name_or_path": str(tmp_path / "no-model")}),
                                    "no-model does not exist: check model.name_or_path"),
        "unknown hub id offline": (tiny_run(text_data, existing_run, **into_existing,
                                            **{"model.name_or_path": "facebook/opt-nonexistent"}),
                                   "'facebook/opt-nonexistent' is not in the local Hugging Face cache"),
        "output_dir is a file": (tiny_run(text_data, a_file), "is a file: choose a directory"),
        # /sys refuses new directories even to root, where permissions would not
        "output_dir not writable": (tiny_run(text_data, "/sys/toolkit-run"),
                                    "output_dir /sys/toolkit-run is not writable (Operation not permitted)"),
        "resume path missing": (tiny_run(text_data, existing_run, resume=str(tmp_path / "nowhere")),
                                "is not a complete checkpoint"),
        "resume path incomplete": (tiny_run(text_data, existing_run, resume=str(incomplete)),
                                   "step-000004 is not a complete checkpoint"),
        "LoRA target not in model": (tiny_run(text_data, existing_run, **into_existing, **{
            "lora.enabled": "true", "lora.target_modules": "q_proj,attn"}), "['attn'] are not modules of this model"),
        "non-positive learning rate": (tiny_run(text_data, existing_run, **into_existing, **{"optim.lr": 0}),
                                       "optim.lr must be > 0"),
        "mutually exclusive options": (tiny_run(text_data, existing_run, **into_existing, **{"lora.merge": "true"}),
                                       "lora.merge=true needs lora.enabled=true"),
    }


@pytest.mark.distributed
def test_bad_input_under_two_processes_is_one_line_and_changes_nothing(text_data, existing_run, tmp_path):
    before = snapshot(existing_run)
    failures = []
    for case, (args, message) in cases(text_data, existing_run, tmp_path).items():
        running = Job("toolkit.train", [str(a) for a in args], config="ddp", extra=["--mixed_precision", "no"])
        try:
            code, _, stderr = running.finish(timeout=300)
            left = running.pids()
        finally:
            running.kill_all()
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        toolkit_frames = [line for line in stderr.splitlines() if f'File "{ROOT / "toolkit"}' in line]
        if code == 0 or len(errors) != 1 or message not in errors[0] or toolkit_frames or left:
            failures.append(f"{case}: exit {code}, errors {errors}, toolkit frames {toolkit_frames[:2]}, "
                            f"processes left {left}\n{stderr[-1500:]}")
    assert not failures, "\n\n".join(failures)
    assert snapshot(existing_run) == before
    assert not (existing_run / ".lock").exists()


def test_a_silent_rank_leaves_the_error_line_to_the_main_process(monkeypatch, capsys):
    """A config error is found by every rank at once; if a non-main rank exited first, the launcher
    would kill the main process before it printed the job's error line. So the non-main rank waits
    (the launcher ends it) and speaks for itself only if nobody did."""
    import time

    from toolkit import config as config_lib

    def bad_config():
        raise config_lib.UserError("train.max_steps must be int, got 'many'")

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(config_lib, "SPEAKER_GRACE_SECONDS", 0.5)
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_:
        config_lib.run_cli(bad_config)
    assert exit_.value.code == 2 and time.perf_counter() - start >= 0.5
    assert capsys.readouterr().err == "error: rank 1: train.max_steps must be int, got 'many'\n"


# A command's end as one rank of a launch sees it: an atexit handler (as train.log's copy registers
# one), an object that only the interpreter's teardown would finalize, then run_cli.
ENDING = """
import atexit, sys
from toolkit.config import UserError, run_cli
atexit.register(print, "atexit handlers ran", flush=True)
class Finalized:
    def __del__(self):
        print("torn down", flush=True)
kept = Finalized()
def main():
    print("buffered, not flushed", end="")
    if sys.argv[1] == "error":
        raise UserError("data.train is missing: pass a file")
run_cli(main)
"""


@pytest.mark.parametrize("world, outcome", [("2", "ok"), ("2", "error"), ("1", "ok"), (None, "ok")])
def test_a_launched_rank_ends_without_the_interpreters_teardown(world, outcome):
    """gloo's threads outlive destroy_process_group, and the interpreter's teardown around them once
    aborted a rank that had finished (config.exit_process): under a launch of several processes a
    rank ends with `_exit`, after its atexit handlers and with its output flushed, keeping its exit
    status, also as the one rank of a one-process launch. A process no launcher started ends as
    Python always does."""
    import subprocess
    import sys

    env = {**os.environ, "RANK": "0"} | ({"WORLD_SIZE": world} if world else {})
    proc = subprocess.run([sys.executable, "-c", ENDING, outcome], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == (2 if outcome == "error" else 0), proc.stderr
    assert proc.stdout.startswith("buffered, not flushedatexit handlers ran\n")
    assert ("torn down" in proc.stdout) == (world is None)
    if outcome == "error":
        assert proc.stderr == "error: data.train is missing: pass a file\n"
