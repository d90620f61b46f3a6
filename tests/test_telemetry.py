"""What a run reports: TensorBoard events, throughput over all ranks, MFU, memory, summary and
curves; a fast --help generated from the config; no known third-party noise."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from conftest import ROOT, environment, launch, metrics, runtime, tiny_opt, tiny_run
from toolkit import config, measure, telemetry
from toolkit.config import UserError

NOISE = ("Failed to load CPU gemm_4bit_forward", "Removed shared tensor", "Setting accelerator to CPU",
         "reduce_scatter_tensor` is deprecated", "all_gather_into_tensor` is deprecated")
MICRO, ACCUM = 4, 2


# --- --help -----------------------------------------------------------------------------------------


HELP_WITHOUT_TORCH = """
import runpy, sys
sys.argv = ["{module}", "--help"]
try:
    runpy.run_module("{module}", run_name="__main__")
except SystemExit:
    pass
print("imported torch:", "torch" in sys.modules)
"""


@pytest.mark.parametrize("module", ["toolkit.train", "toolkit.evaluate", "toolkit.export", "toolkit.doctor", "toolkit.plan",
                                    "toolkit.config", "toolkit.demo_data"])
def test_help_answers_before_the_heavy_libraries_load(module):
    """--help and argument errors come before torch (seconds to import) is loaded: what makes them fast,
    checked without a clock."""
    proc = subprocess.run([sys.executable, "-c", HELP_WITHOUT_TORCH.format(module=module)], cwd=ROOT,
                          env=environment(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"usage: {module}" in proc.stdout and proc.stdout.rstrip().endswith("imported torch: False")


def test_help_lists_every_key_with_its_default():
    proc = subprocess.run([sys.executable, "-m", "toolkit.train", "--help"], cwd=ROOT, env=environment(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for line in ("train.max_steps=0", "optim.lr=0.0003", "train.report_to=tensorboard", "train.peak_tflops=0.0",
                 "lora.target_modules=q_proj,v_proj", "model.dropout=null"):
        assert f"  {line}\n" in proc.stdout
    assert "Optimizer steps to run" in proc.stdout


def test_every_key_has_a_meaning_that_names_its_choices():
    docs = config.field_docs()
    keys = [key for key, _ in config._keys(config.RunConfig(), "")]
    assert len(keys) > 40 and not [k for k in keys if not docs.get(k)]  # a new field needs its docstring
    for key, allowed in config.CHOICES.items():
        assert all(choice in docs[key] for choice in allowed), key


# --- units ------------------------------------------------------------------------------------------


def test_real_tokens_are_the_attention_mask_padded_ones_every_position():
    from toolkit.data import Collator

    lengths = [3, 7, 1, 5]
    batch = Collator(pad_token_id=1)([{"input_ids": list(range(2, 2 + n))} for n in lengths])
    real, padded = measure.count_tokens(batch)
    assert int(real) == sum(lengths) == int(batch["attention_mask"].sum())
    assert padded == len(lengths) * max(lengths)


def test_model_flops_full_and_lora():
    from toolkit.config import LoraConfig
    from toolkit.model import apply_lora

    model = tiny_opt()
    positions = model.model.decoder.embed_positions.weight.numel()
    everything = sum(p.numel() for p in model.parameters())  # lm_head is tied: counted once
    attention = 12 * 2 * 128  # layers x hidden
    assert measure.model_flops(model) == {"flops_per_token": 6 * (everything - positions),
                                            "attention_flops_per_token_per_position": attention}
    lora = apply_lora(model, LoraConfig(enabled=True))
    adapters = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert 0 < adapters < everything
    assert measure.model_flops(lora)["flops_per_token"] == 6 * adapters + 4 * (everything - positions)


def test_gpu_peaks_by_name_and_precision():
    assert measure.gpu_peak_tflops("NVIDIA A100-SXM4-80GB", half=True) == 312
    assert measure.gpu_peak_tflops("NVIDIA H100 80GB HBM3", half=True) == 989
    assert measure.gpu_peak_tflops("NVIDIA L4", half=False) == 30.3
    assert measure.gpu_peak_tflops("NVIDIA L40S", half=True) is None  # not an L4
    assert measure.gpu_peak_tflops("Tesla T4", half=True) == 65


def test_cpu_probe_counts_2n3_flops_per_matmul_in_tflops(monkeypatch):
    """The probe's arithmetic on a clock that ticks 1 ms per reading: each n x n matmul is 2n^3
    FLOPs in 1 ms, so the rate is exact; a wrong FLOP count or unit is off by 2x to 1000x. (Real
    rates depend on what else the machine does: the runs' MFU is checked against them below.)"""
    import itertools

    import torch

    ticks = itertools.count()
    monkeypatch.setattr(measure.time, "perf_counter", lambda: next(ticks) * 1e-3)
    n = 256
    assert measure.matmul_tflops(torch.device("cpu"), n=n, seconds=0.01) == pytest.approx(2 * n**3 / 1e-3 / 1e12)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux only: peaks can't be reset elsewhere")
def test_cpu_peak_memory_counts_from_the_last_reset():
    """Each phase's peak (MemoryAtStart, the training summary) must not be an older peak. getrusage's
    ru_maxrss keeps, for good, the peak of what the process ran before its exec (a launcher, a
    wrapper), which no reset clears: here 800 MB, allocated before the exec."""
    measure = (
        "import torch\n"
        "from toolkit import measure\n"
        "measure.reset_peak_memory()\n"
        "before = measure.memory_now_gb()\n"
        "small = torch.ones(50 * 2**20, dtype=torch.uint8)  # written, so resident\n"
        "print(measure.peak_memory_gb() - before)\n")
    exec_after_800_mb = ("import os, sys\n"
                         "big = b'x' * (800 * 2**20)\n"
                         f"os.execv(sys.executable, [sys.executable, '-c', {measure!r}])\n")
    proc = subprocess.run([sys.executable, "-c", exec_after_800_mb], cwd=ROOT,
                          env=environment(CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 0.04 < float(proc.stdout) < 0.2  # the 50 MB, not the 800 MB


def test_known_noise_is_dropped_and_nothing_else():
    import torch
    import torch.distributed as dist

    def kept(logger: str, message: str) -> bool:
        return bool(logging.getLogger(logger).filter(logging.makeLogRecord({"msg": message})))

    def deprecation_warnings(quiet: bool) -> list[str]:
        with warnings.catch_warnings(record=True) as seen:  # restores the filters afterwards
            warnings.simplefilter("always")
            if quiet:
                telemetry.quiet_known_noise()  # in front of "always": it decides for these messages
            for deprecated in (dist.all_gather_into_tensor, dist.reduce_scatter_tensor):
                with pytest.raises((ValueError, RuntimeError)):  # no process group: the warning comes first
                    deprecated(torch.zeros(2), torch.zeros(2))
            warnings.warn("`torch.distributed.something_else` is deprecated", FutureWarning)
        return [str(w.message).split(" is deprecated")[0] for w in seen if w.category is FutureWarning]

    assert deprecation_warnings(quiet=False) == ["`torch.distributed.all_gather_into_tensor`",
                                                 "`torch.distributed.reduce_scatter_tensor`",
                                                 "`torch.distributed.something_else`"]
    assert deprecation_warnings(quiet=True) == ["`torch.distributed.something_else`"]

    assert not kept("accelerate.utils.other", "[RANK 0] Removed shared tensor {'lm_head.weight'} while saving. "
                                              "This should be OK, but check ...")
    assert kept("accelerate.utils.other", "[RANK 0] Removed shared tensor {'model.decoder.fc1.weight'} while saving")
    assert not kept("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community: "
                                                     "No module named 'kernels'. Please make sure ...")
    assert kept("bitsandbytes.backends.cpu.ops", "some other bitsandbytes warning")
    assert not kept("DeepSpeed", "Setting accelerator to CPU. If you have GPU or other accelerator, ...")
    assert kept("DeepSpeed", "something else DeepSpeed says")


def test_wandb_goes_offline_unless_logged_in_and_online(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))  # no login stored
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert telemetry.choose_wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the user's choice wins
    assert telemetry.choose_wandb_mode() == "disabled"


def test_report_to():
    assert telemetry.trackers("none", "out") is None
    tensorboard, = telemetry.trackers("tensorboard", "out")
    assert tensorboard.name == "tensorboard" and Path(tensorboard.logging_dir_param) == Path("out/tensorboard")
    try:
        import wandb  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="train.report_to=wandb needs wandb, which is not installed: pip install"):
            telemetry.trackers("wandb", "out")
    else:
        assert telemetry.trackers("all", "out")[1] == "wandb"


def test_flatten_gives_tracker_values():
    flat = telemetry.flatten(config.to_dict(config.load(None, ["data.train=x.jsonl"])) | {"runtime": {"a": {"b": 1}}})
    assert flat["lora.target_modules"] == "q_proj,v_proj" and flat["runtime.a.b"] == 1
    assert all(v is None or isinstance(v, (int, float, str, bool)) for v in flat.values())


# --- a tiny run -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def split_sft(sft_data, tmp_path_factory) -> tuple[Path, Path]:
    """sft_data as 576 training and 24 held-out examples: 72 whole optimizer steps of 4 x 2 per
    epoch, so one epoch consumes every training example exactly once (nothing dropped)."""
    lines = sft_data.read_text().splitlines(keepends=True)
    folder = tmp_path_factory.mktemp("split")
    (folder / "train.jsonl").write_text("".join(lines[:576]))
    (folder / "eval.jsonl").write_text("".join(lines[576:]))
    return folder / "train.jsonl", folder / "eval.jsonl"


def sft_run(train: Path, heldout: Path, out: Path, **overrides) -> list[str]:
    args = {"data.format": "sft", "data.eval": str(heldout), "data.block_size": 128, "train.max_steps": 0,
            "train.epochs": 1, "train.micro_batch_size": MICRO, "train.grad_accum_steps": ACCUM,
            "train.log_every": 4, "eval.every": 36, "eval.max_batches": 2, "checkpoint.every": 36, **overrides}
    return tiny_run(train, out, **args)


@pytest.fixture(scope="module")
def one_process(split_sft, tmp_path_factory):
    out = tmp_path_factory.mktemp("telemetry") / "run"
    proc = launch("toolkit.train", sft_run(*split_sft, out))
    return out, proc


def epoch_tokens(out: Path, train: Path) -> int:
    """Non-pad tokens of the run's training sequences, tokenized by the toolkit with the run's tokenizer."""
    from transformers import AutoTokenizer

    from toolkit import data

    cfg = config.load(out / "config.yaml")
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    sequences = data.tokenize_for_training([data.Part(str(train), "sft", data.load_source(str(train)))], tokenizer,
                                           cfg.data)
    assert len(sequences) % (MICRO * ACCUM) == 0  # the epoch is whole steps: no sequence dropped
    return sum(len(ids) for ids in sequences["input_ids"])


def test_run_reports_tokens_mfu_summary_curves_and_tensorboard(one_process, split_sft):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, proc = one_process
    train, evals = metrics(out)
    assert [r["step"] for r in train] == list(range(4, 73, 4))
    # Dynamic padding: every logged window has padding, and the real count is exact: over the epoch
    # it is the sum of the training sequences' lengths.
    assert all(r["tokens_per_s"] < r["padded_tokens_per_s"] for r in train)
    assert sum(r["input_tokens"] for r in train) == epoch_tokens(out, split_sft[0])
    info = runtime(out)
    for r in train:  # model FLOPs per token, x tokens per second, over the probe's peak
        attention = info["attention_flops_per_token_per_position"] * 128  # at most one block of positions
        low, high = ((info["flops_per_token"] + extra) * r["tokens_per_s"] / (info["peak_tflops"] * 1e12)
                     for extra in (0, attention))
        assert 0.998 * low <= r["mfu"] <= 1.002 * high, r  # (mfu keeps 4 significant digits)
    assert all(r["peak_mem_gb_max"] == r["peak_mem_gb"] > 0 for r in train)  # one process
    assert info["peak_tflops"] > 0 and info["peak_tflops_source"].startswith("measured: ")
    assert info["flops_per_token"] > 0 and info["attention_flops_per_token_per_position"] == 12 * 2 * 128

    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == summary["max_steps"] == 72
    assert summary["input_tokens"] == sum(r["input_tokens"] for r in train) < summary["padded_tokens"]
    assert summary["final_loss"] == train[-1]["loss"]
    assert summary["best_eval_perplexity"] == min(r["eval_perplexity"] for r in evals)
    assert {k: summary[f"final_{k}"] for k in ("eval_loss", "eval_perplexity")} == {
        k: evals[-1][k] for k in ("eval_loss", "eval_perplexity")}
    assert 0 < summary["mfu"] <= 1 and summary["tokens_per_s"] > 0 and summary["peak_mem_gb"] > 0
    assert "summary: step 72/72, " in proc.stdout
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train/loss")}
    assert logged.keys() == {r["step"] for r in train}
    for r in train:
        assert logged[r["step"]] == pytest.approx(r["loss"], rel=1e-6)  # float32 in the event file
    assert {e.step for e in events.Scalars("eval/perplexity")} == {0, 36, 72}
    # every scalar in a group, and the run's events in one folder (no empty hparams folder beside it)
    assert {tag.split("/")[0] for tag in events.Tags()["scalars"]} == {"train", "eval", "perf", "comm"}
    assert [p.name for p in (out / "tensorboard").iterdir() if p.is_dir()] == []

    for noise in NOISE:
        assert noise not in proc.stderr and noise not in proc.stdout


@pytest.mark.distributed
def test_two_processes_count_both_ranks(one_process, split_sft, tmp_path):
    """DDP on 2 ranks with half the accumulation consumes the same sequences per step as the
    1-process run: the logged token counts, summed over both ranks, must be the same."""
    single, _ = one_process
    out = tmp_path / "ddp"
    proc = launch("toolkit.train", sft_run(*split_sft, out, **{"train.grad_accum_steps": ACCUM // 2}), config="ddp",
                  extra=["--mixed_precision", "no"])
    one, _ = metrics(single)
    two, _ = metrics(out)
    assert [(r["step"], r["input_tokens"]) for r in two] == [(r["step"], r["input_tokens"]) for r in one]
    assert sum(r["input_tokens"] for r in two) == epoch_tokens(out, split_sft[0])
    assert all(r["peak_mem_gb_max"] >= r["peak_mem_gb"] > 0 for r in two)
    assert all(0 < r["mfu"] <= 1 for r in two)
    for noise in NOISE:
        assert noise not in proc.stderr and noise not in proc.stdout


def test_the_optional_kernel_noise_is_dropped_by_logger_and_subject_not_by_one_text(capsys):
    """bitsandbytes says, kernel by kernel, that it could not fetch optional CPU kernels from the Hub
    (the newest releases install `kernels`), and under HF_HUB_OFFLINE `kernels` says it cannot check
    that kernel's publisher; those lines are dropped, every other warning of either logger still shows."""
    telemetry.quiet_known_noise()
    said = {
        "bitsandbytes.backends.cpu.ops": ["Failed to load CPU gemm_4bit_forward from kernels-community: offline",
                                          "Failed to load CPU gemv_4bit from kernels-community: no kernels >= 0.11.1",
                                          "something else went wrong"],
        "kernels._internals.hf_hub": ["Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'"
                                      " because Hugging Face Hub is in offline mode.",
                                      "Skipping publisher trust check for 'someone/their-kernel' because Hugging Face"
                                      " Hub is in offline mode."],
    }
    handler = logging.StreamHandler()
    for name, messages in said.items():
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        try:
            for message in messages:
                logger.warning(message)
        finally:
            logger.removeHandler(handler)
    assert capsys.readouterr().err.splitlines() == [
        "something else went wrong",
        "Skipping publisher trust check for 'someone/their-kernel' because Hugging Face Hub is in offline mode."]


@pytest.mark.parametrize("variant, hub", [(["optim.name=adamw_8bit"], {}),
                                          (["lora.enabled=true", "lora.quantize=nf4"], {"HF_HUB_OFFLINE": "1"})])
def test_the_demo_starts_and_trains_without_a_warning(variant, hub, tmp_path):
    """The demo's run on one process as `accelerate launch` starts it (with 8-bit Adam, or as QLoRA with
    the Hub switched off as offline users and CI do): nothing on stderr but progress bars, and no
    warning on stdout. `make test-latest` runs this too, with the newest releases in pyproject's ranges
    (transformers, accelerate, bitsandbytes with `kernels`), whose new warnings would show here first."""
    proc = launch("toolkit.train", ["--config", "examples/demo.yaml", "train.max_steps=2", "eval.every=2",
                                    "eval.max_batches=1", *variant, f"output_dir={tmp_path}"], env=hub)
    progress = re.compile(r"^[\w -]+:\s+\d+%\|.*\| \d+/\d+ \[")  # tqdm's bars (train, tokenize, ...)
    printed = [line for line in re.split(r"[\r\n]", proc.stderr) if line.strip() and not progress.match(line)]
    assert printed == [], "\n".join(printed)
    assert not [line for line in proc.stdout.splitlines() if "warn" in line.lower()], proc.stdout
