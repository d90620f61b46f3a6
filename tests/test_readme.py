"""Every command the README gives runs, as written, at tiny sizes: a README whose first command the
toolkit refuses can't ship again.

What changes, and only that: the hub model and data become tiny-opt and built-in data (no Hub
here), with few steps (the export then reads step 4, not 200); `runs/` and `data/` live in a
temporary directory; `accelerate launch` gets a free port; the optional `[...]` parts are given."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, environment, free_port

TINY_TRAINING = ["model.name_or_path=tiny-opt", "data.train=builtin:stdlib-docs", "data.eval=null",
                 "data.block_size=64", "train.max_steps=4", "checkpoint.every=2", "train.micro_batch_size=2",
                 "train.grad_accum_steps=1", "eval.every=2", "eval.max_batches=2", "eval.micro_batch_size=2"]


def readme_blocks() -> list[list[str]]:
    """The README's ```bash blocks, each a list of commands (continuations joined, comments dropped)."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [[line.strip() for line in re.sub(r"\\\n\s*", " ", block).splitlines()
             if line.strip() and not line.lstrip().startswith("#")] for block in blocks]


def as_run_here(command: str, tmp: Path) -> list[str]:
    command = re.sub(r"\s+#.*$", "", command)  # a trailing comment
    command = re.sub(r"\[([^\]]*)\]", r"\1", command)  # optional parts: given
    command = re.sub(r"(?<![\w/])(runs|data)/", lambda m: f"{tmp}/{m.group(1)}/", command)
    command = re.sub(r"(--output-dir) runs\b", rf"\1 {tmp}/runs", command)
    argv = shlex.split(command.replace("step-000200", "step-000004"))
    if argv[:2] == ["accelerate", "launch"]:
        argv = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port()), *argv[2:]]
    elif argv[0] == "python":
        argv[0] = sys.executable
    if "toolkit.train" in argv:
        argv += TINY_TRAINING
    if "toolkit.evaluate" in argv:
        argv += ["--max-batches", "2"]
    return argv


def test_the_readme_has_its_two_set_up_commands_first():
    assert readme_blocks()[:2] == [["make demo"], ["make test"]]
    # `make demo` runs in test_train.py; `make test` is this suite, which .ci/run calls
    assert "make test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.distributed
def test_every_use_command_runs_as_written(tmp_path):
    (use,) = [block for block in readme_blocks() if any("toolkit.train" in c for c in block)
              and not any("sbatch" in c for c in block)]
    (tmp_path / "data").mkdir()
    from toolkit.demo_data import stdlib_docs
    (tmp_path / "data" / "heldout.jsonl").write_text("".join(json.dumps(d) + "\n" for _, d in zip(range(20), stdlib_docs())))
    outputs = {}
    for command in use:
        argv = as_run_here(command, tmp_path)
        proc = subprocess.run(argv, cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        tool = next(word for word in argv if word.startswith("toolkit."))
        outputs[tool] = outputs.get(tool, "") + proc.stdout
    assert (tmp_path / "runs/x/final/model.safetensors").is_file()
    assert (tmp_path / "runs/x/step200-hf/model.safetensors").is_file()
    assert (tmp_path / "data/sft-tasks.jsonl").is_file() and (tmp_path / "runs/x/eval.json").is_file()
    assert outputs["toolkit.doctor"].rstrip().endswith("all checks passed")
    plans = outputs["toolkit.plan"].splitlines()  # the examples find a fit and say how to launch it
    assert [line for line in plans if line.startswith("recommended: ")] == ["recommended: ddp", "recommended: zero3"]
    assert plans[-1].startswith("  accelerate launch --config_file accelerate_configs/zero3.yaml")


def test_the_cluster_commands_name_files_that_exist():
    """sbatch needs a cluster of GPUs; test_slurm.py runs these scripts on a real Slurm. Here: what
    the README's cluster commands name is there."""
    cluster = [c for block in readme_blocks() for c in block if "sbatch" in c]
    assert cluster
    for command in cluster:
        for word in shlex.split(re.sub(r"\[([^\]]*)\]", r"\1", command)):
            if re.match(r"(examples|accelerate_configs)/", word):
                assert (ROOT / word).is_file(), (command, word)
