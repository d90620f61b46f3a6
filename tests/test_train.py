"""End to end: 2-process DDP equals 1 process at the same global batch; resume after a real
crash, with another process count, from a path, across an epoch boundary; checkpoint keeping;
export; bad input; the README's demo."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ACCELERATE_CONFIGS, ROOT, Job, fake_accelerator, launch, logged_steps, metrics, runtime, tiny_run
from toolkit import checkpoint, config as config_lib
from toolkit.config import UserError
from toolkit.telemetry import trim_metrics

# fp32 on CPU: the two runs differ only in summation order (two half-batch gradients averaged by
# all-reduce vs one full batch), a few ulps per step that Adam carries forward: 1e-4 relative over
# 12 steps. (Packed text gives every micro-batch the same number of targets, so these runs can't
# tell a token-weighted loss from a mean of means: the SFT accumulation test in test_features can.)
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
    """8 steps with checkpoints every 4, then resume=auto to 12."""
    out = tmp_path_factory.mktemp("ddp")
    args = {"train.micro_batch_size": 2, "train.grad_accum_steps": 2, "checkpoint.every": 4, "eval.every": 4,
            "checkpoint.keep_last": 0}
    launch("toolkit.train", tiny_run(text_data, out, **args, **{"train.max_steps": 8}), config="ddp",
           extra=["--mixed_precision", "no"])
    launch("toolkit.train", tiny_run(text_data, out, **args, **{"train.max_steps": 12, "resume": "auto"}),
           config="ddp", extra=["--mixed_precision", "no"])
    return out


@pytest.mark.distributed
def test_ddp_runs_two_synchronised_processes(ddp_resumed_run):
    info = runtime(ddp_resumed_run)
    assert info["num_processes"] == 2 and info["distributed_type"] == "MULTI_CPU"
    assert info["global_batch_size"] == 8 and info["mixed_precision"] == "no"
    # how it was started: the launch command, the accelerate config and its content, the code's commit
    assert info["launch_command"].startswith("accelerate launch --config_file ") and "resume=auto" in info["launch_command"]
    ddp_yaml = ACCELERATE_CONFIGS / "ddp.yaml"
    assert info["accelerate_config"] == str(ddp_yaml.resolve())
    assert info["accelerate_config_sha256"] == hashlib.sha256(ddp_yaml.read_bytes()).hexdigest()
    if (ROOT / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", info["git_commit"])


@pytest.mark.distributed
def test_resumed_ddp_run_logs_every_step_once_with_evaluations(ddp_resumed_run):
    train, evals = metrics(ddp_resumed_run)
    assert [r["step"] for r in train] == list(range(1, 13))
    assert [r["step"] for r in evals] == [0, 4, 8, 12]
    assert all(r["eval_perplexity"] > 1 and r["eval_tokens"] > 0 for r in evals)
    assert {p.name for p in (ddp_resumed_run / "checkpoints").iterdir()} == {
        "step-000004", "step-000008", "step-000012"}
    state = json.loads((ddp_resumed_run / "checkpoints" / "step-000008" / "trainer_state.json").read_text())
    assert state["step"] == 8 and state["batch"] == 16  # 8 steps x 2 micro-batches per rank


@pytest.mark.distributed
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


@pytest.mark.distributed
def test_export_loads_with_plain_transformers_and_equals_the_single_run(single_run, ddp_resumed_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models = [AutoModelForCausalLM.from_pretrained(run / "final") for run in (single_run, ddp_resumed_run)]
    tokenizer = AutoTokenizer.from_pretrained(ddp_resumed_run / "final")
    assert (ddp_resumed_run / "final" / "model.safetensors").is_file()
    single, ddp = (m.state_dict() for m in models)
    assert {k: (v.shape, v.dtype) for k, v in ddp.items()} == {k: (v.shape, v.dtype) for k, v in single.items()}
    for name, a in single.items():
        if name.endswith("k_proj.bias"):
            # A key bias adds the same score to every key of a query: softmax cancels it, so its
            # gradient is zero but for rounding, which Adam's normalised step turns into moves of
            # up to lr. Its values are noise of the summation order (the two runs differ there).
            assert ddp[name].abs().max() <= 12 * 1e-3, name  # 12 steps at lr 1e-3, from zero
            continue
        # Summation order (two half-batch gradients all-reduced vs one batch, other thread
        # counts) differs by ulps that Adam carries over 12 steps; measured 8e-4 at most on
        # matrices, on weights of dying ReLU units. Biases start at zero, so their norm is only
        # the 12 steps' movement, of which Adam's normalised steps on near-zero gradient elements
        # make noise a larger share (measured 9e-3 on a v_proj bias, on a CPU with other
        # kernels). A wrong export (untrained: zero biases; shuffled weights) is off by O(1).
        rtol = 2e-2 if name.endswith(".bias") else 5e-3
        assert (ddp[name] - a).norm() <= rtol * a.norm(), (name, float((ddp[name] - a).norm() / a.norm()))
    ids = tokenizer("The module provides functions for working with files. Return the value", return_tensors="pt")
    logits = [m(**ids).logits for m in models]
    # the weights' noise above, through the network: measured 1.7e-4 at most on one CPU, 2.1e-3 on
    # another (logits of a few units; a wrong export moves them by O(1))
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-3, atol=5e-3)
    assert torch.isfinite(models[1](**ids, labels=ids["input_ids"]).loss)


def test_a_16_bit_export_is_the_fp32_one_rounded_at_half_the_size(single_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from toolkit import export

    step = single_run / "checkpoints" / "step-000012"
    export.main(["--checkpoint", str(step), "--out", str(tmp_path / "bf16"), "--dtype", "bf16"])
    fp32, bf16 = (load_file(d / "model.safetensors") for d in (single_run / "final", tmp_path / "bf16"))
    assert set(bf16) == set(fp32) and {v.dtype for v in bf16.values()} == {torch.bfloat16}
    for key, value in fp32.items():
        assert torch.equal(bf16[key], value.to(torch.bfloat16)), key
    size = [(d / "model.safetensors").stat().st_size for d in (single_run / "final", tmp_path / "bf16")]
    assert size[1] == pytest.approx(size[0] / 2, rel=0.01)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto").dtype == torch.bfloat16


def test_the_offline_export_reads_a_parameter_at_a_time_into_a_model_without_weights(single_run, tmp_path,
                                                                                    monkeypatch):
    """toolkit.export never holds the checkpoint's model: the model it names the weights by is on the
    meta device (building one with weights fails here), and with one tensor per shard at most the
    tensor being written and the next are alive, of the 36 the model has."""
    import weakref

    from transformers import AutoModelForCausalLM

    from toolkit import checkpoint, export, model as model_lib

    def no_whole_model(*args, **kwargs):
        raise AssertionError("the exporter built the model with its weights")

    monkeypatch.setattr(model_lib, "initial_model", no_whole_model)
    read, alive, most = checkpoint.trained_weights, [], []

    def watched(step_dir, names):
        for name, tensor in read(step_dir, names):
            alive[:] = [ref for ref in alive if ref() is not None]
            most.append(len(alive))
            alive.append(weakref.ref(tensor))
            yield name, tensor

    monkeypatch.setattr(checkpoint, "trained_weights", watched)
    step = single_run / "checkpoints" / "step-000012"
    export.main(["--checkpoint", str(step), "--out", str(tmp_path / "out"), "--max-shard-size", "1KB"])
    assert len(most) == 36 and max(most) <= 2, most
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    for key, value in load_file(single_run / "final" / "model.safetensors").items():
        assert torch.equal(exported[key], value), key


def test_the_fused_head_and_loss_train_like_transformers_loss(single_run, text_data, tmp_path):
    """The default loop (fused LM head + loss, fused AdamW) against transformers' head and loss."""
    launch("toolkit.train", tiny_run(text_data, tmp_path, **{"train.micro_batch_size": 4, "train.grad_accum_steps": 2,
                                                             "train.max_steps": 12, "train.fused_loss": "false"}),
           config=None)
    fused, plain = metrics(single_run)[0], metrics(tmp_path)[0]
    # The same sums in another order (chunked head matmuls, logsumexp): ~1e-7 a step, which Adam
    # carries forward; RTOL over 12 steps is far below a wrong loss (percent).
    assert [r["loss"] for r in fused] == pytest.approx([r["loss"] for r in plain], rel=RTOL)
    assert runtime(single_run)["cpu_threads"] == len(os.sched_getaffinity(0))  # one process: all cores


def test_resume_continues_exactly_after_a_real_crash(single_run, text_data, tmp_path):
    """SIGKILL a run mid-way (after its step-4 checkpoint, before the end): resume=auto redoes the
    steps after the checkpoint and reproduces the uninterrupted run's losses."""
    out = tmp_path / "crashed"
    args = {"train.micro_batch_size": 4, "train.grad_accum_steps": 2, "checkpoint.every": 4}
    # constant LR, so a longer planned run computes the same first steps; it is killed long before its end
    running = Job("toolkit.train", tiny_run(text_data, out, **args, **{"train.max_steps": 100000}), config=None)
    try:
        running.wait_for(lambda: (out / "checkpoints" / "step-000004").is_dir() and len(logged_steps(out)) >= 6,
                         what="step 6")
        os.kill(running.proc.pid, signal.SIGKILL)
        running.proc.wait()
    finally:
        running.kill_all()
    assert not (out / "final").exists() and (out / ".lock").exists()  # a crash: nothing cleaned up
    launch("toolkit.train", tiny_run(text_data, out, **args, **{"train.max_steps": 12, "resume": "auto"}),
           config=None)
    reference, _ = metrics(single_run)
    resumed, _ = metrics(out)
    assert [r["step"] for r in resumed] == list(range(1, 13))  # the killed run's steps 5.. were redone
    for a, b in zip(reference, resumed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6) and b["lr"] == a["lr"], a["step"]


@pytest.mark.distributed
def test_resume_on_another_process_count_with_the_same_global_batch_is_exact(single_run, ddp_resumed_run,
                                                                             text_data, tmp_path):
    """The DDP run's step-8 checkpoint (2 processes x micro 2 x accumulation 2) resumed by 1 process
    x micro 4 x accumulation 2: the data position maps by samples seen, so steps 9..12 equal the
    1-process run's."""
    out = tmp_path / "run"
    shutil.copytree(ddp_resumed_run / "tokenizer", out / "tokenizer")
    args = {"train.micro_batch_size": 4, "train.grad_accum_steps": 2, "train.max_steps": 12,
            "resume": str(ddp_resumed_run / "checkpoints" / "step-000008")}
    launch("toolkit.train", tiny_run(text_data, out, **args), config=None)
    reference = {r["step"]: r for r in metrics(single_run)[0]}
    resumed = metrics(out)[0]
    assert [r["step"] for r in resumed] == [9, 10, 11, 12]
    for b in resumed:
        assert b["loss"] == pytest.approx(reference[b["step"]]["loss"], rel=RTOL), b["step"]


def test_a_resume_that_would_train_something_else_is_refused(single_run):
    step_4 = single_run / "checkpoints" / "step-000004"
    cfg = config_lib.load(step_4 / "config.yaml")
    cfg.train.micro_batch_size = 8  # global batch 8 -> 16
    with pytest.raises(UserError, match="global batch 8 -> 16"):
        checkpoint.check_resume(step_4, cfg, num_processes=1, running_layout="full")
    cfg = config_lib.load(step_4 / "config.yaml")
    cfg.data.block_size = 32
    with pytest.raises(UserError, match="data.block_size 64 -> 32"):
        checkpoint.check_resume(step_4, cfg, num_processes=1, running_layout="full")
    cfg = config_lib.load(step_4 / "config.yaml")
    with pytest.raises(UserError, match="holds full state; launch with the accelerate config it was trained with"):
        checkpoint.check_resume(step_4, cfg, num_processes=1, running_layout="deepspeed")
    cfg.train.micro_batch_size, cfg.train.grad_accum_steps = 2, 4  # the same global batch: mapped by samples
    assert checkpoint.check_resume(step_4, cfg, num_processes=1, running_layout="full")["batch"] == 16


def test_a_resume_with_another_packing_or_data_fields_is_refused(tmp_path):
    """They change what the saved data position counts, so resuming under them trains other data."""
    cfg = config_lib.RunConfig(output_dir=str(tmp_path))
    cfg.data.train = "train.jsonl"
    saved = checkpoint.save(fake_accelerator(), cfg, {"step": 2, "epoch": 0, "batch": 2, "tokens": 0})
    for key, value in (("data.packing", True), ("data.text_field", "body"), ("data.prompt_field", "question"),
                       ("data.response_field", "answer")):
        cfg = config_lib.load(saved / "config.yaml")
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
        with pytest.raises(UserError, match=f"the run differs from it in {key} "):
            checkpoint.check_resume(saved, cfg, num_processes=1, running_layout="full")


@pytest.fixture(scope="module")
def epoch_runs(text_data, tmp_path_factory):
    """Two epochs of a small data set, logged every 2 steps (and asked for a stop signal as often),
    checkpoints every 3; then a second run resumed by path from the last checkpoint before the
    epoch boundary. The first counts the values each step reads back from the device."""
    root = tmp_path_factory.mktemp("epochs")
    small = root / "small.jsonl"
    small.write_text("".join(text_data.read_text().splitlines(keepends=True)[:40]))
    args = {"train.max_steps": 0, "train.epochs": 2, "train.log_every": 2, "train.stop_check_every": 2,
            "checkpoint.every": 3, "checkpoint.keep_last": 0, "eval.every": 0}
    launch("tests.instrumented_train", ["--count-conversions", str(root / "read_backs.json"), "--",
                                        *tiny_run(small, root / "full", **args)], config=None)
    per_epoch = runtime(root / "full")["max_steps"] // 2
    before_boundary = per_epoch - per_epoch % 3 if per_epoch % 3 else per_epoch - 3
    resumed = root / "resumed"
    shutil.copytree(root / "full" / "tokenizer", resumed / "tokenizer")
    launch("toolkit.train", tiny_run(small, resumed, **args, **{
        "resume": str(root / "full" / "checkpoints" / f"step-{before_boundary:06d}")}), config=None)
    return root / "full", resumed, small


def test_epochs_count_steps_and_log_every_n(epoch_runs):
    full, _, small = epoch_runs
    from toolkit import data
    from toolkit.model import build_tokenizer

    cfg = config_lib.load(full / "config.yaml")
    blocks = data.tokenize_for_training(data.load_raw(cfg.data, cfg.train.seed)[0],
                                        build_tokenizer(cfg.model, cache_dir=full / "tokenizer"), cfg.data)
    steps = 2 * (len(blocks) // 4)  # 2 epochs of full micro-batches of 4, no accumulation
    assert runtime(full)["max_steps"] == steps and steps >= 8
    logged = [r["step"] for r in metrics(full)[0]]
    assert logged == sorted(set(range(2, steps + 1, 2)) | {steps})
    assert {r["epoch"] for r in metrics(full)[0]} == {0, 1}
    state = json.loads((full / "checkpoints" / f"step-{steps:06d}" / "trainer_state.json").read_text())
    assert (state["epoch"], state["batch"]) == (1, len(blocks) // 4)  # the second epoch, all taken


def test_only_steps_that_log_or_save_read_values_back_from_the_device(epoch_runs):
    """On a GPU every .item(), float(tensor), bool(tensor), ... waits for the device to finish all
    the work queued so far, so the host can't queue the next step ahead. Steps that neither log, save
    nor ask for a stop signal read nothing back (tests/instrumented_train.py counts them)."""
    full = epoch_runs[0]
    counts = {int(step): n for step, n in json.loads((full.parent / "read_backs.json").read_text()).items()}
    steps = runtime(full)["max_steps"]
    quiet = [s for s in range(1, steps) if s % 2 and s % 3]
    assert len(quiet) >= 2 and not any(counts.get(s) for s in quiet), counts
    assert all(counts.get(s) for s in range(2, steps + 1, 2)), counts  # and it sees the reads of the others


def test_resume_by_path_across_an_epoch_boundary_is_exact(epoch_runs):
    full, resumed, _ = epoch_runs
    reference = {r["step"]: r for r in metrics(full)[0]}
    ours = metrics(resumed)[0]
    assert ours and {r["epoch"] for r in ours} == {0, 1}  # it crossed the boundary
    for r in ours:
        assert r["loss"] == pytest.approx(reference[r["step"]]["loss"], rel=1e-6), r["step"]


def test_keep_last_deletes_old_checkpoints_but_never_the_resumed_one(tmp_path):
    cfg = config_lib.RunConfig(output_dir=str(tmp_path))
    cfg.checkpoint.keep_last = 2
    accelerator = fake_accelerator()
    resumed = checkpoint.save(accelerator, cfg, {"step": 1})
    for step in (2, 3, 4):
        checkpoint.save(accelerator, cfg, {"step": step}, keep=(resumed,))
    names = [p.name for p in checkpoint.checkpoint_dirs(tmp_path / "checkpoints")]
    assert names == ["step-000001", "step-000003", "step-000004"]


def test_an_interrupted_save_is_skipped_and_a_failed_one_keeps_the_earlier(tmp_path, monkeypatch):
    cfg = config_lib.RunConfig(output_dir=str(tmp_path))
    accelerator = fake_accelerator()
    checkpoint.save(accelerator, cfg, {"step": 2})
    (tmp_path / "checkpoints" / "step-000004.tmp").mkdir()  # killed while saving step 4
    (tmp_path / "checkpoints" / "step-000004.tmp" / "model.safetensors").write_text("half")
    assert checkpoint.find_resume("auto", tmp_path).name == "step-000002"

    def disk_full(directory):
        raise OSError(28, "No space left on device")
    accelerator.save_state = disk_full
    with pytest.raises(UserError, match=r"could not write checkpoint .*step-000006 \(No space left on device\); "
                                        r"earlier checkpoints are intact \(newest: step-000002\)"):
        checkpoint.save(accelerator, cfg, {"step": 6})
    assert checkpoint.find_resume("auto", tmp_path).name == "step-000002"


def test_a_checkpoint_carries_its_tokenizer_and_loads_wherever_it_is_copied(text_data, tmp_path):
    """A preset's tokenizer is trained by the run: a checkpoint copied away from its run directory
    must still be loadable for evaluation and export."""
    from safetensors.torch import save_file

    from toolkit.model import build_tokenizer, initial_model

    cfg = config_lib.RunConfig(output_dir=str(tmp_path / "run"))
    cfg.model.name_or_path, cfg.data.train = "tiny-opt", str(text_data)
    tokenizer = build_tokenizer(cfg.model, (json.loads(line)["text"] for line in text_data.read_text().splitlines()))
    trained = initial_model(cfg.model, tokenizer, seed=cfg.train.seed + 1)  # other weights than the run's start
    weights = {k: v.clone() for k, v in trained.state_dict().items()}  # clones: safetensors refuses tied tensors
    accelerator = fake_accelerator()
    accelerator.save_state = lambda d: save_file(weights, f"{d}/model.safetensors")
    saved = checkpoint.save(accelerator, cfg, {"step": 2}, tokenizer=tokenizer)
    copy = tmp_path / "elsewhere" / saved.name
    shutil.copytree(saved, copy)
    shutil.rmtree(tmp_path / "run")
    model, loaded, _ = checkpoint.load_model(copy)
    assert loaded.get_vocab() == tokenizer.get_vocab() and loaded("a b").input_ids == tokenizer("a b").input_ids
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name]), name


def test_resuming_an_older_checkpoint_sets_the_newer_ones_aside(tmp_path):
    cfg = config_lib.RunConfig(output_dir=str(tmp_path))
    cfg.checkpoint.keep_last = 0
    for step in (2, 4, 6):
        checkpoint.save(fake_accelerator(), cfg, {"step": step})
    root = tmp_path / "checkpoints"
    moved = checkpoint.set_aside_newer(root / "step-000002", tmp_path)
    assert [p.name for p in moved] == ["step-000004", "step-000006"]
    assert checkpoint.find_resume("auto", tmp_path).name == "step-000002"
    assert len(list(root.glob("abandoned-*/step-000006"))) == 1  # kept, out of resume=auto's way


def test_a_line_cut_short_by_a_kill_does_not_stop_a_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    trim_metrics(path, last_step=2)
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'


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


@pytest.mark.distributed
def test_make_demo_trains_with_two_processes_and_evaluates(tmp_path):
    """The README's first command, shortened: set-up is already done (the venv exists)."""
    out = tmp_path / "demo"
    proc = subprocess.run(["make", "demo", f"DEMO_DIR={out}", "VENV=" + str(ROOT / ".venv"),
                           "DEMO_ARGS=train.max_steps=4 eval.every=2 eval.max_batches=2 checkpoint.every=2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert runtime(out)["num_processes"] == 2
    assert [r["step"] for r in metrics(out)[1]] == [0, 2, 4]
    report = json.loads((out / "eval_final.json").read_text())["results"][0]
    assert report["documents"] > 0 and report["perplexity"] > 1 and "perplexity" in proc.stdout
    # the main process's console, as printed, without the progress bar's redraws
    log = (out / "train.log").read_text()
    summary = next(line for line in proc.stdout.splitlines() if line.startswith("summary: "))
    assert summary in log.splitlines() and "step 2: eval_loss" in log and "\r" not in log
    samples = [json.loads(line) for line in (out / "samples.jsonl").open()]
    assert [(s["step"], s["prompt"]) for s in samples] == [(step, prompt) for step in (0, 2, 4)
                                                           for prompt in ("Return the", "This module provides")]


def test_keep_best_survives_keep_last_and_early_stopping_stops_where_it_should(text_data, tmp_path):
    """Evaluations every 2 steps report the scripted held-out losses 5, 4, 3 (step 4, the best), 3.5,
    3.6, 3.7: with a patience of 3 the run stops after step 10's evaluation, the third without
    improvement, and exports final/. keep_last=1 keeps the newest checkpoint (step 10), keep_best
    the best (step 4), which summary.json names."""
    out = tmp_path / "run"
    run = tiny_run(text_data, out, **{"train.max_steps": 20, "eval.every": 2, "eval.max_batches": 1,
                                      "checkpoint.every": 2, "checkpoint.keep_last": 1, "checkpoint.keep_best": "true",
                                      "train.early_stopping_patience": 3})
    proc = launch("tests.instrumented_train", ["--eval-losses", "5,4,3,3.5,3.6,3.7,3.8,3.9", "--", *run])
    assert "early stopping at step 10: the held-out loss has not improved for 3 evaluations since step 4" in proc.stdout
    train, evals = metrics(out)
    assert train[-1]["step"] == 10 and [r["step"] for r in evals] == [0, 2, 4, 6, 8, 10]
    assert [p.name for p in checkpoint.checkpoint_dirs(out / "checkpoints")] == ["step-000004", "step-000010"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_eval_step"] == 4 and summary["best_checkpoint"] == str(out / "checkpoints" / "step-000004")
    assert json.loads((out / "final" / "export_info.json").read_text()) == {"step": 10}


def test_keep_best_and_early_stopping_need_evaluations():
    with pytest.raises(UserError, match="set checkpoint.every to a multiple of eval.every"):
        config_lib.load(None, ["data.train=x.jsonl", "checkpoint.keep_best=true", "checkpoint.every=3", "eval.every=2"])
    with pytest.raises(UserError, match="train.early_stopping_patience counts evaluations: set eval.every"):
        config_lib.load(None, ["data.train=x.jsonl", "train.early_stopping_patience=2"])


def test_a_chat_and_instruction_mix_trains_and_saves_the_template_it_trained_with(tmp_path):
    from transformers import AutoTokenizer

    from toolkit import data

    out = tmp_path / "mix"
    launch("toolkit.train", tiny_run("x", out, **{"data.train": "[builtin:chat-tasks,builtin:sft-tasks]",
                                                  "data.weights": "[1,0.5]", "data.block_size": 128,
                                                  "model.attn_implementation": "eager"}), config=None)
    assert runtime(out)["data_format"] == "chat,sft" and runtime(out)["attn_implementation"] == "eager"
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    assert tokenizer.chat_template == data.DEFAULT_CHAT_TEMPLATE
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 plus 2?"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == "</s>### User:\nWhat is 2 plus 2?\n\n### Assistant:\n"
    card = (out / "final" / "README.md").read_text()  # its "How to load" runs as written
    code = card.split("```python\n")[1].split("```")[0].replace("path/to/this/directory", str(out / "final"))
    assert "apply_chat_template" in code
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=300)
    launch("toolkit.evaluate", ["--checkpoint", str(out / "final"), "--report", str(out / "eval.json")], config=None)
    (result,) = json.loads((out / "eval.json").read_text())["results"]
    assert result["documents"] == 75 + 150  # 5% of each source held out, every one scored
