"""Training features, each visible in what the run does: exact accumulation on variable-length SFT
data, real bf16/fp16 (with loss scaling that skips overflowing steps), activation checkpointing,
and LoRA with a non-empty adapter under ZeRO-3 and FSDP."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import launch, metrics, runtime, tiny_run

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


@pytest.mark.distributed
@pytest.mark.parametrize("config", ["ddp", "zero2"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_really_runs(config, precision, fp32_runs, text_data, tmp_path):
    """The matmuls really run in bf16/fp16 (the dtype a linear layer's output has in the first
    forward, recorded by the run), and the losses stay close to fp32: bf16 keeps ~3 significant
    digits and fp16 ~4 in the matmuls, so 4 steps stay within 1e-2 relative."""
    if config == "zero2" and precision == "fp16" and not deepspeed_has_fp16():
        # DeepSpeed's accelerator here has no fp16 (on CPU: unless oneDNN has it, as on CPUs with
        # AVX512-FP16): the run must refuse before any work
        proc = launch("toolkit.train", tiny_run(text_data, tmp_path), config=config,
                      extra=["--mixed_precision", precision], check=False)
        assert proc.returncode != 0 and "error: DeepSpeed's cpu accelerator has no fp16" in proc.stderr
        assert not (tmp_path / "metrics.jsonl").exists()
        return
    launch("toolkit.train", tiny_run(text_data, tmp_path), config=config, extra=["--mixed_precision", precision])
    assert runtime(tmp_path)["mixed_precision"] == precision
    ours, reference = metrics(tmp_path)[0], metrics(fp32_runs["ddp"])[0]
    assert {r["compute_dtype"] for r in ours} == {"bfloat16" if precision == "bf16" else "float16"}
    assert {r["compute_dtype"] for r in reference} == {"float32"}
    for a, b in zip(reference, ours):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-2), a["step"]
    if precision == "fp16":
        assert all(r["loss_scale"] > 1 for r in ours)  # dynamic loss scaling is on
    # final/ holds the fp32 master weights under every strategy (DeepSpeed trains a bf16 copy of
    # the model; saving that would make every value bf16-representable), named as in fp32 runs
    exported, fp32_export = (load_file(run / "final" / "model.safetensors") for run in (tmp_path, fp32_runs["ddp"]))
    assert {k: v.dtype for k, v in exported.items()} == {k: v.dtype for k, v in fp32_export.items()}
    weight = exported["model.decoder.layers.0.fc1.weight"]
    assert weight.dtype == torch.float32 and (weight != weight.to(torch.bfloat16).float()).any()


def test_fp16_on_cpu_skips_an_overflowing_step_and_leaves_weights_untouched():
    """accelerate alone trains "fp16" in fp32 on CPU; the toolkit switches on autocast and a
    GradScaler. An inf gradient must skip the step, keep the weights and halve the scale."""
    from accelerate.state import AcceleratorState

    from toolkit import strategy

    AcceleratorState._reset_state(True)
    try:
        accelerator = strategy.Accelerator(mixed_precision="fp16", cpu=True)
        strategy.enable_cpu_fp16(accelerator)
        model = torch.nn.Linear(4, 4)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        model, optimizer = accelerator.prepare(model, optimizer)
        out = model(torch.ones(2, 4))
        assert out.dtype == torch.float32 and accelerator.native_amp  # autocast ran, outputs upcast
        before = {k: v.clone() for k, v in model.state_dict().items()}
        scale = accelerator.scaler.get_scale()
        accelerator.backward(out.sum() * float("inf"))
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        assert accelerator.optimizer_step_was_skipped
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert accelerator.scaler.get_scale() == scale / 2
        assert strategy.step_stats(accelerator, optimizer)["skipped"] is True
    finally:
        AcceleratorState._reset_state(True)


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
    from types import SimpleNamespace

    from transformers import OPTConfig, OPTForCausalLM

    from toolkit import strategy
    from toolkit.model import PRESETS

    saved = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = OPTForCausalLM(OPTConfig(**{**PRESETS["tiny-opt"], "num_hidden_layers": 4}))
        if checkpointing:
            plain = SimpleNamespace(distributed_type=strategy.DistributedType.NO)
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
