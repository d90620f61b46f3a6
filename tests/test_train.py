"""End to end: 2-process DDP equals 1 process at the same global batch, resume, export."""

import json
import shutil

import pytest
import torch

from conftest import launch, metrics, runtime, tiny_run

# fp32 on CPU: the two runs differ only in summation order (two half-batch gradients averaged by
# all-reduce vs one full batch), a few ulps per step that Adam carries forward; 1e-4 relative
# over 12 steps is far below a wrong normalisation (which shifts the loss by percent).
RTOL = 1e-4


@pytest.fixture(scope="module")
def single_run(text_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    launch("toolkit.train", tiny_run(text_data, out, **{"train.micro_batch_size": 4, "train.grad_accum_steps": 2,
                                                        "train.max_steps": 12, "checkpoint.every": 4,
                                                        "checkpoint.keep_last": 0}), config=None)
    return out


@pytest.fixture(scope="module")
def ddp_resumed_run(text_data, tmp_path_factory):
    """8 steps with checkpoints every 4, then resume=auto to 12: the issue's acceptance run."""
    out = tmp_path_factory.mktemp("ddp")
    args = {"train.micro_batch_size": 2, "train.grad_accum_steps": 2, "checkpoint.every": 4, "eval.every": 4,
            "checkpoint.keep_last": 0}
    launch("toolkit.train", tiny_run(text_data, out, **args, **{"train.max_steps": 8}), config="ddp",
           extra=["--mixed_precision", "no"])
    launch("toolkit.train", tiny_run(text_data, out, **args, **{"train.max_steps": 12, "resume": "auto"}),
           config="ddp", extra=["--mixed_precision", "no"])
    return out


def test_ddp_runs_two_synchronised_processes(ddp_resumed_run):
    info = runtime(ddp_resumed_run)
    assert info["num_processes"] == 2 and info["distributed_type"] == "MULTI_CPU"
    assert info["global_batch_size"] == 8 and info["mixed_precision"] == "no"


def test_resumed_ddp_run_logs_every_step_once_with_evaluations(ddp_resumed_run):
    train, evals = metrics(ddp_resumed_run)
    assert [r["step"] for r in train] == list(range(1, 13))
    assert [r["step"] for r in evals] == [0, 4, 8, 12]
    assert all(r["eval_perplexity"] > 1 and r["eval_tokens"] > 0 for r in evals)
    assert {p.name for p in (ddp_resumed_run / "checkpoints").iterdir()} == {
        "step-000004", "step-000008", "step-000012"}
    state = json.loads((ddp_resumed_run / "checkpoints" / "step-000008" / "trainer_state.json").read_text())
    assert state["step"] == 8 and state["batch"] == 16  # 8 steps x 2 micro-batches per rank


def test_two_processes_equal_one_at_the_same_global_batch(single_run, ddp_resumed_run):
    """Also proves resume: steps 9..12 of the DDP run come after a restart from step 8."""
    single, _ = metrics(single_run)
    ddp, _ = metrics(ddp_resumed_run)
    assert [r["tokens"] for r in single] == [r["tokens"] for r in ddp]
    for a, b in zip(single, ddp):
        assert b["loss"] == pytest.approx(a["loss"], rel=RTOL), a["step"]
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-9)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
    assert single[-1]["loss"] < single[0]["loss"] - 0.1  # it learns


def test_export_loads_with_plain_transformers_and_equals_the_single_run(single_run, ddp_resumed_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models = [AutoModelForCausalLM.from_pretrained(run / "final") for run in (single_run, ddp_resumed_run)]
    tokenizer = AutoTokenizer.from_pretrained(ddp_resumed_run / "final")
    assert (ddp_resumed_run / "final" / "model.safetensors").is_file()
    for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5, msg=name)
    ids = tokenizer("The module provides", return_tensors="pt")
    loss = models[1](**ids, labels=ids["input_ids"]).loss
    assert torch.isfinite(loss)


def test_resume_continues_exactly_after_a_crash(single_run, text_data, tmp_path):
    """Copy the single run's step-4 checkpoint as if it had crashed after it: steps 5..12 repeat exactly."""
    crashed = tmp_path / "crashed"
    shutil.copytree(single_run / "tokenizer", crashed / "tokenizer")
    shutil.copytree(single_run / "checkpoints" / "step-000004", crashed / "checkpoints" / "step-000004")
    launch("toolkit.train", tiny_run(text_data, crashed, **{"train.micro_batch_size": 4, "train.grad_accum_steps": 2,
                                                            "train.max_steps": 12, "resume": "auto"}), config=None)
    reference, _ = metrics(single_run)
    resumed, _ = metrics(crashed)
    assert [r["step"] for r in resumed] == list(range(5, 13))
    for a, b in zip(reference[4:], resumed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6) and b["lr"] == a["lr"]


def test_bad_input_is_one_error_line_and_destroys_nothing(single_run, text_data, tmp_path):
    before = (single_run / "metrics.jsonl").read_text()
    cases = [
        (tiny_run(text_data, tmp_path / "a", **{"train.max_step": 3}), "did you mean train.max_steps?"),
        (tiny_run(tmp_path / "missing.jsonl", tmp_path / "b"), "missing.jsonl does not exist"),
        (tiny_run(text_data, tmp_path / "c", **{"data.block_size": 4096}), "longer than the model allows (512"),
        (tiny_run(text_data, single_run), "already holds a run: continue it with resume=auto"),
    ]
    for args, message in cases:
        proc = launch("toolkit.train", args, config=None, check=False)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
        assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == \
            [proc.stderr.strip().splitlines()[-1]]
    assert (single_run / "metrics.jsonl").read_text() == before
