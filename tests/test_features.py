"""Training features, each visible in what the run does: exact accumulation on variable-length SFT
data, real bf16/fp16 (the loss scaler decides which steps happen), activation checkpointing,
and LoRA with a non-empty adapter under ZeRO-3 and FSDP."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import fake_accelerator, launch, metrics, runtime, tiny_opt, tiny_run

FP32 = ["--mixed_precision", "no"]


def sft(sft_data, out, **overrides):
    # cosine with warmup, so the test also shows the LR advances once per optimizer step
    base = {"data.format": "sft", "data.block_size": 48, "optim.scheduler": "cosine", "optim.warmup_steps": 2,
            "train.max_steps": 4, "optim.max_grad_norm": 0.5}
    return tiny_run(sft_data, out, **{**base, **overrides})


@pytest.fixture(scope="module")
def sft_reference(sft_data, tmp_path_factory):
    """1 process x micro batch 8 x accumulation 1."""
    out = tmp_path_factory.mktemp("sft_ref")
    launch("toolkit.train", sft(sft_data, out, **{"train.micro_batch_size": 8}), config=None)
    return out


@pytest.mark.parametrize("config, micro, accum", [
    (None, 2, 4), *(pytest.param(c, 2, 2, marks=pytest.mark.distributed) for c in ("ddp", "zero2", "fsdp"))])
def test_accumulation_on_variable_length_sft_equals_one_big_batch(config, micro, accum, sft_reference, sft_data,
                                                                  tmp_path):
    """Micro-batches hold different numbers of response tokens, so a mean of per-batch means would
    differ from the one-batch loss; the token-weighted sum over the window must not. fp32, same
    samples per step; only summation order differs (see test_strategies for the tolerance)."""
    launch("toolkit.train", sft(sft_data, tmp_path, **{"train.micro_batch_size": micro,
                                                       "train.grad_accum_steps": accum}),
           config=config, extra=FP32 if config else ())
    ours, reference = metrics(tmp_path)[0], metrics(sft_reference)[0]
    assert runtime(tmp_path)["global_batch_size"] == 8
    assert [r["tokens"] for r in ours] == [r["tokens"] for r in reference]
    assert len({r["tokens"] for r in reference}) > 1  # the steps really differ in token count
    for a, b in zip(reference, ours):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3), a["step"]
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-9)


@pytest.fixture(scope="module")
def fp32_runs(text_data, tmp_path_factory):
    runs = {}
    for config in ("ddp", "fsdp"):
        runs[config] = tmp_path_factory.mktemp(f"fp32_{config}")
        launch("toolkit.train", tiny_run(text_data, runs[config]), config=config, extra=FP32)
    return runs


def deepspeed_has_fp16() -> bool:
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_fp16_supported())


# Tolerances against fp32 (rel., the loss of each of 4 steps). A 16-bit matmul rounds its inputs to
# 8 (bf16) or 11 (fp16) significant bits, u = 2^-9 = 2e-3 or 2^-12 = 2.4e-4 per element; the loss
# averages thousands of such products, and measured here it moved by at most 1.0e-4 (bf16, DeepSpeed)
# and 3.4e-5 (fp16, DDP). 10x the measured and still below u: a loss rounded to bf16 itself (FSDP2
# before its outputs were left in fp32: 7.65625, 3.9e-3 off) or a step skipped wrongly fails.
PRECISION_RTOL = {"bf16": 1e-3, "fp16": 3e-4}


@pytest.mark.distributed
@pytest.mark.parametrize("config", ["ddp", "fsdp", "zero2", "zero3"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_really_runs(config, precision, fp32_runs, text_data, tmp_path, tmp_path_factory):
    """The matmuls really run in bf16/fp16 (the dtype a linear layer's output has in the first
    forward, recorded by the run), gradients are reduced in the dtype the run records, and the
    losses stay within 16-bit rounding of fp32 (PRECISION_RTOL). fp16 steps that the loss scaler
    skipped (FSDP2's fp16 parameters overflow at the initial scale of 2^16, as on a GPU) are
    compared with an fp32 run that skips the same steps."""
    proc = launch("toolkit.train", tiny_run(text_data, tmp_path), config=config,
                  extra=["--mixed_precision", precision], check=False)
    if config.startswith("zero") and precision == "fp16" and refused_without_fp16(proc, tmp_path):
        return
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = runtime(tmp_path)
    assert info["mixed_precision"] == precision
    # DDP and FSDP sum gradients over ranks and micro-batches in fp32; DeepSpeed in its communication
    # dtype, which is the 16-bit one unless its JSON sets communication_data_type.
    assert info["grad_reduce_dtype"] == ("float32" if config in ("ddp", "fsdp") else
                                         {"bf16": "bfloat16", "fp16": "float16"}[precision])
    ours = metrics(tmp_path)[0]
    skipped = [r["step"] for r in ours if r.get("skipped")]
    reference = metrics(fp32_runs["ddp"])[0]
    if skipped:
        assert config == "fsdp" and precision == "fp16", skipped
        same_skips = tmp_path_factory.mktemp("fp32_skipping")
        launch("tests.instrumented_train", ["--overflow-steps", ",".join(map(str, skipped)), "--",
                                            *tiny_run(text_data, same_skips)], config="ddp", extra=FP32)
        reference = metrics(same_skips)[0]
    assert {r["compute_dtype"] for r in ours} == {"bfloat16" if precision == "bf16" else "float16"}
    assert {r["compute_dtype"] for r in reference} == {"float32"}
    for a, b in zip(reference, ours):
        assert b["loss"] == pytest.approx(a["loss"], rel=PRECISION_RTOL[precision]), a["step"]
    print(f"{config} {precision}: max relative loss difference to fp32 "
          f"{max(abs(b['loss'] - a['loss']) / a['loss'] for a, b in zip(reference, ours)):.2e}, skipped {skipped}")
    if precision == "fp16":
        assert all(r["loss_scale"] > 1 for r in ours)  # dynamic loss scaling is on
    # final/ holds the fp32 master weights under every strategy (DeepSpeed trains a bf16 copy of
    # the model; saving that would make every value bf16-representable), named as in fp32 runs
    exported, fp32_export = (load_file(run / "final" / "model.safetensors") for run in (tmp_path, fp32_runs["ddp"]))
    assert {k: v.dtype for k, v in exported.items()} == {k: v.dtype for k, v in fp32_export.items()}
    weight = exported["model.decoder.layers.0.fc1.weight"]
    assert weight.dtype == torch.float32 and (weight != weight.to(torch.bfloat16).float()).any()


OVERFLOWS = (3, 4, 5)  # optimizer steps whose gradients tests.instrumented_train makes infinite
FP16_CONFIGS = ["single", *(pytest.param(c, marks=pytest.mark.distributed) for c in ("ddp", "fsdp", "zero2"))]


def fp16_with_overflows(config, text_data, out, **overrides):
    """8 steps of fp16 with infinite gradients at OVERFLOWS (as an overflow on a GPU), evaluating
    after every step, so the held-out loss shows whether the weights moved."""
    run = tiny_run(text_data, out, **{"train.max_steps": 8, "eval.every": 1, "eval.max_batches": 1, **overrides})
    return launch("tests.instrumented_train", ["--overflow-steps", ",".join(map(str, OVERFLOWS)), "--", *run],
                  config=config, extra=["--mixed_precision", "fp16"], check=False)


def refused_without_fp16(proc, out) -> bool:
    """DeepSpeed's accelerator here may have no fp16 (on CPU: unless oneDNN has it, as on CPUs with
    AVX512-FP16); then the run must refuse before any work."""
    if deepspeed_has_fp16():
        return False
    assert proc.returncode != 0 and "error: DeepSpeed's cpu accelerator has no fp16" in proc.stderr
    assert not (out / "metrics.jsonl").exists()
    return True


def one_error_line(proc) -> str:
    """The toolkit's one `error:` line, and no traceback through the toolkit. (accelerate 1.16's
    one-process launcher repeats the child's stderr in its own CalledProcessError: the same line.)"""
    errors = {line for line in proc.stderr.splitlines() if line.startswith("error:")}
    toolkit_frames = [line for line in proc.stderr.splitlines() if "/toolkit/" in line and 'File "' in line]
    assert proc.returncode != 0 and len(errors) == 1 and not toolkit_frames, proc.stderr[-3000:]
    return errors.pop()


@pytest.mark.parametrize("config", FP16_CONFIGS)
def test_an_fp16_overflow_is_skipped_by_the_loss_scaler_and_training_goes_on(config, text_data, tmp_path):
    """The scaler decides: an overflowing step is skipped (not one weight moves, so the held-out
    loss after it is the one before it, to the bit), the scale drops, and the run trains on to its
    end. An overflow is not a bad step. (FSDP2 computes with fp16 parameters, whose first steps also
    overflow by themselves at the initial scale of 2^16, as they do on a GPU.)"""
    proc = fp16_with_overflows(config, text_data, tmp_path)
    if config == "zero2" and refused_without_fp16(proc, tmp_path):
        return
    assert proc.returncode == 0, proc.stderr[-3000:]
    train, evals = metrics(tmp_path)
    assert [r["step"] for r in train] == list(range(1, 9)) and (tmp_path / "final" / "model.safetensors").is_file()
    held_out = {r["step"]: r["eval_loss"] for r in evals}
    scale = {0: 2.0**16, **{r["step"]: r["loss_scale"] for r in train}}
    for r in train:
        step = r["step"]
        assert r["overflow"] == (1 if r.get("skipped") else 0), r
        if step in OVERFLOWS:
            assert r.get("skipped"), r
        if r.get("skipped"):
            assert held_out[step] == held_out[step - 1], step
            if config != "zero2":  # DeepSpeed first spends its hysteresis (2): see below
                assert scale[step] == scale[step - 1] / 2, step
        else:
            assert held_out[step] != held_out[step - 1] and scale[step] == scale[step - 1], step
    if config == "zero2":  # of the three overflows in a row, the first only uses up the hysteresis
        assert scale[OVERFLOWS[-1]] == scale[OVERFLOWS[0] - 1] / 4
    assert not any(r.get("skipped") for r in train[OVERFLOWS[-1]:])  # it trains on at the lower scale
    print(f"{config}: loss scale by step {[scale[s] for s in sorted(scale)]}")


@pytest.mark.parametrize("config", FP16_CONFIGS)
def test_an_fp16_overflow_at_the_scale_floor_ends_the_run_with_one_line(config, text_data, tmp_path):
    """The same overflows with the scale's floor at its initial value: each is a bad step, and the
    third in a row ends the run with one line that names the last good checkpoint."""
    proc = fp16_with_overflows(config, text_data, tmp_path, **{
        "train.min_loss_scale": 2**16, "checkpoint.every": 1, "checkpoint.keep_last": 0})
    if config == "zero2" and refused_without_fp16(proc, tmp_path):
        return
    error = one_error_line(proc)
    train, _ = metrics(tmp_path)
    stopped = train[-1]["step"]
    assert stopped <= OVERFLOWS[-1] and [r["step"] for r in train if r.get("skipped")][-3:] == [
        stopped - 2, stopped - 1, stopped]
    assert all(r["loss_scale"] == 2**16 for r in train)  # never below its floor
    assert f"step {stopped}: fp16 gradients overflowing with the loss scale at its floor (65536) for 3 steps " \
           "in a row" in error
    good = tmp_path / "checkpoints" / f"step-{stopped - 3:06d}"
    assert (f"the last good checkpoint is {good}" in error) if stopped > 3 else ("no checkpoint was saved" in error)
    assert not (tmp_path / "final").exists()


def test_deepspeed_overflows_are_counted_with_its_own_scaler(monkeypatch):
    """The guard under DeepSpeed fp16 (which this CPU may not run), with DeepSpeed's own loss scaler
    driven as its ZeRO optimizer drives it: its hysteresis, its floor, and no exception at the floor
    (DeepSpeed raises a bare Exception there by default: a traceback instead of the one-line error)."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType
    from deepspeed.runtime.fp16 import loss_scaler
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    from toolkit.guard import StepGuard

    monkeypatch.setattr(loss_scaler.dist, "get_rank", lambda: 0)  # it names the rank in its overflow message

    scaler = DynamicLossScaler(init_scale=2.0**16, scale_window=1000, min_scale=2.0**15,
                               delayed_shift=2, consecutive_hysteresis=False, dtype=torch.float16)
    zero = SimpleNamespace(loss_scaler=scaler, overflow=False, cur_scale=scaler.cur_scale)

    class Engine:  # accelerate's DeepSpeedOptimizerWrapper: its step() is a no-op, DeepSpeed stepped in backward
        optimizer = zero

        def step(self):
            pass

    accelerator = fake_accelerator(scaler=None, distributed_type=DistributedType.DEEPSPEED, state=SimpleNamespace(
        deepspeed_plugin=SimpleNamespace(deepspeed_config={"fp16": {"enabled": True}})))
    guard = StepGuard(accelerator, Engine(), min_loss_scale=1.0)
    assert guard.min_loss_scale == 2.0**15 and scaler.raise_error_at_min_scale is False
    advanced, scales = [], []
    for overflow in (False, True, True, True, True, False):
        zero.overflow = overflow
        if overflow:  # what the ZeRO optimizer does in its step
            scaler.update_scale(True)
        zero.cur_scale = scaler.cur_scale
        advanced.append(guard.step(Engine(), torch.tensor(1.0), torch.tensor(float("inf") if overflow else 1.0)))
        scales.append(guard.scale)
    assert advanced == [True, False, False, False, False, True]
    # hysteresis 2: the first overflow keeps the scale; then halved, then held at the floor 2^15
    assert scales == [2.0**16, 2.0**16, 2.0**15, 2.0**15, 2.0**15, 2.0**15]
    health = guard.read()
    assert health == {"bad_in_a_row": 2, "healthy": True, "skipped": False,  # steps 4 and 5: at the floor
                      "loss_is_finite": True}
    assert guard.scale_record() == {"loss_scale": 2.0**15, "overflow": 4}


@pytest.mark.distributed
@pytest.mark.parametrize("config", ["ddp", "fsdp"])
def test_activation_checkpointing_gives_the_same_losses(config, fp32_runs, text_data, tmp_path):
    launch("toolkit.train", tiny_run(text_data, tmp_path, **{"model.gradient_checkpointing": "true"}),
           config=config, extra=FP32)
    assert runtime(tmp_path)["activation_checkpointing"] == ("fsdp" if config == "fsdp" else "transformers")
    for a, b in zip(metrics(fp32_runs[config])[0], metrics(tmp_path)[0]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)  # recomputation is the same arithmetic


def test_activation_checkpointing_saves_activation_memory():
    """Bytes autograd keeps for backward, counted exactly with saved-tensor hooks, with the
    toolkit's own switch (as a single-process or DDP run uses it)."""
    from toolkit import strategy

    saved = {}
    for checkpointing in (False, True):
        model = tiny_opt(num_hidden_layers=4)
        if checkpointing:
            plain = fake_accelerator()
            assert strategy.enable_activation_checkpointing(plain, model) == "transformers"
        model.train()
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        ids = torch.randint(0, 2048, (8, 128), generator=torch.Generator().manual_seed(0))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        saved[checkpointing] = total
    assert saved[True] < 0.6 * saved[False], saved


@pytest.mark.distributed
@pytest.mark.parametrize("config", ["zero3", "fsdp"])
def test_lora_trains_only_adapters_and_exports_them_under_sharding(config, text_data, tmp_path):
    out = tmp_path / "run"
    args = {"lora.enabled": "true", "lora.merge": "true", "lora.r": 4, "optim.lr": 1e-2, "checkpoint.every": 2}
    launch("toolkit.train", tiny_run(text_data, out, **args, **{"train.max_steps": 2}), config=config, extra=FP32)
    launch("toolkit.train", tiny_run(text_data, out, **args, **{"resume": "auto"}), config=config, extra=FP32)
    info = runtime(out)
    assert 0 < info["trainable_params"] < 0.05 * info["params_numel"]
    assert [r["step"] for r in metrics(out)[0]] == [1, 2, 3, 4]

    adapter = load_file(out / "final" / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.numel() > 0 for v in adapter.values())  # the naive save writes empty tensors
    assert all(v.abs().max() > 0 for v in lora_b)  # B starts at zero: non-zero means it trained
    assert json.loads((out / "final" / "adapter_config.json").read_text())["r"] == 4
    card = (out / "final" / "README.md").read_text()  # the toolkit's model card, with the run's evaluations
    assert "for 4 optimizer steps with LoRA (r=4" in card and "| 4 |" in card and "PeftModel" in card

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolkit.config import ModelConfig
    from toolkit.model import initial_model

    merged = AutoModelForCausalLM.from_pretrained(out / "final" / "merged")
    ids = torch.randint(4, 2048, (2, 32), generator=torch.Generator().manual_seed(0))
    # base weights never change under LoRA, so the initial model (same seed) plus the adapter
    # must reproduce the merged model
    base = initial_model(ModelConfig(name_or_path="tiny-opt"), AutoTokenizer.from_pretrained(out / "final"), seed=7)
    with_adapter = PeftModel.from_pretrained(base, out / "final")
    torch.testing.assert_close(with_adapter(input_ids=ids).logits, merged(input_ids=ids).logits,
                               rtol=1e-4, atol=1e-4)


def test_qlora_trains_on_a_4_bit_base_evaluates_on_it_and_merges_into_full_precision(text_data, tmp_path):
    """One process (QLoRA runs on one or under DDP): the base's linear layers in nf4, the adapter
    trained on them; toolkit.evaluate scores the adapter on that same 4-bit base (the run's last
    evaluation, to fp32 accumulation order); final/merged holds the dequantized base plus B @ A x scaling."""
    from bitsandbytes.functional import dequantize_4bit
    from transformers import AutoTokenizer

    from toolkit.config import ModelConfig
    from toolkit.model import quantized_base

    out = tmp_path / "qlora"
    args = {"lora.enabled": "true", "lora.quantize": "nf4", "lora.merge": "true", "lora.r": 4, "optim.lr": 1e-2,
            "eval.every": 2, "eval.max_batches": 2}
    launch("toolkit.train", tiny_run(text_data, out, **args), config=None)
    info = runtime(out)
    assert 0 < info["trainable_params"] < 0.05 * info["params_numel"]
    launch("toolkit.evaluate", ["--checkpoint", str(out / "final"), "--max-batches", "2", "--batch-size", "4",
                                "--report", str(tmp_path / "eval.json")], config=None)
    scored = json.loads((tmp_path / "eval.json").read_text())["results"][0]
    assert scored["loss"] == pytest.approx(metrics(out)[1][-1]["eval_loss"], rel=1e-5)

    base = quantized_base(ModelConfig(name_or_path="tiny-opt"), "nf4", AutoTokenizer.from_pretrained(out / "final"),
                          seed=7, device=torch.device("cpu"), compute_dtype=torch.float32)
    merged = load_file(out / "final" / "merged" / "model.safetensors")
    adapter = load_file(out / "final" / "adapter_model.safetensors")
    prefix = "base_model.model.model.decoder.layers.0.self_attn.q_proj"
    layer = base.model.decoder.layers[0]
    q_proj = dequantize_4bit(layer.self_attn.q_proj.weight.data, layer.self_attn.q_proj.weight.quant_state)
    delta = adapter[f"{prefix}.lora_B.weight"] @ adapter[f"{prefix}.lora_A.weight"] * (16 / 4)  # alpha / r
    assert delta.abs().max() > 0 and merged["model.decoder.layers.0.self_attn.q_proj.weight"].dtype == torch.float32
    torch.testing.assert_close(merged["model.decoder.layers.0.self_attn.q_proj.weight"], q_proj + delta)
    fc1 = dequantize_4bit(layer.fc1.weight.data, layer.fc1.weight.quant_state)  # no adapter: the base, in floats
    assert torch.equal(merged["model.decoder.layers.0.fc1.weight"], fc1)
    assert "quantization_config" not in json.loads((out / "final" / "merged" / "config.json").read_text())


def test_qlora_is_refused_where_the_base_is_sharded_or_cast(tmp_path):
    from accelerate.utils import DistributedType

    from toolkit import strategy
    from toolkit.config import UserError, load

    cfg = load(None, ["data.train=x.txt", "lora.enabled=true", "lora.quantize=nf4"])
    for kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        with pytest.raises(UserError, match="lora.quantize=nf4 runs on one process or under DDP"):
            strategy.check_lora(fake_accelerator(distributed_type=kind), cfg)
    strategy.check_lora(fake_accelerator(distributed_type=DistributedType.MULTI_CPU), cfg)
    with pytest.raises(UserError, match="lora.quantize=fp4 quantizes LoRA's frozen base: set lora.enabled=true"):
        load(None, ["data.train=x.txt", "lora.quantize=fp4"])


def test_lora_keeps_the_frozen_base_in_the_compute_dtype_and_the_adapter_in_fp32(text_data, tmp_path):
    out = tmp_path / "bf16"
    launch("toolkit.train", tiny_run(text_data, out, **{"lora.enabled": "true", "lora.merge": "true"}),
           extra=["--mixed_precision", "bf16"])
    info = runtime(out)
    assert info["param_dtypes"] == {"trainable": ["float32"], "frozen": ["bfloat16"]}
    frozen = info["params_numel"] - info["trainable_params"]
    assert info["param_bytes"] == 2 * frozen + 4 * info["trainable_params"]  # half the base's fp32 bytes
    merged = load_file(out / "final" / "merged" / "model.safetensors")
    assert {t.dtype for t in merged.values()} == {torch.float32}  # the merge is written in full precision


def test_a_qlora_run_with_dropout_resumes_exactly(text_data, tmp_path):
    """Dropout draws from the global RNG, which the checkpoint carries: an evaluation before the
    checkpoint (the short run's last step) and the data loader's start after a resume must not
    move it (the same for any run with dropout). Bit for bit, on one process; the checkpoint's
    quantization state of the 4-bit base is not read, its adapter and optimizer state are."""
    args = {"lora.enabled": "true", "lora.quantize": "nf4", "lora.dropout": 0.1, "model.dropout": 0.1,
            "optim.lr": 1e-2, "checkpoint.every": 2}
    launch("toolkit.train", tiny_run(text_data, tmp_path / "whole", **args), config=None)
    launch("toolkit.train", tiny_run(text_data, tmp_path / "cut", **args, **{"train.max_steps": 2}), config=None)
    launch("toolkit.train", tiny_run(text_data, tmp_path / "cut", **args, **{"resume": "auto"}), config=None)
    whole, cut = metrics(tmp_path / "whole")[0], metrics(tmp_path / "cut")[0]
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in cut] == [(r["step"], r["loss"], r["grad_norm"]) for r in whole]
