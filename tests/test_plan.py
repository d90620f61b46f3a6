"""toolkit.plan: parameter counts against transformers, memory rows against the ZeRO paper's
formulas and DeepSpeed's own estimators, the CLI's JSON, inputs and errors. No process group."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from toolkit import plan
from toolkit.config import UserError, run_cli
from conftest import ACCELERATE_CONFIGS, ROOT

N13 = 12_853_473_280  # facebook/opt-13b, from its published shape (the meta-device test below agrees)
GIB = 2**30


def run_json(capsys, *args: str) -> dict:
    plan.main([*args, "--json"])
    return json.loads(capsys.readouterr().out)


def rows(result: dict) -> dict:
    return {r["config"]: r for r in result["rows"]}


def meta_numel(config: dict, lora_r: int = 0) -> int:
    """Parameters (or, with lora_r, trainable LoRA parameters) of the real model, built without memory."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    with torch.device("meta"):
        model = OPTForCausalLM(OPTConfig(**{k: v for k, v in config.items() if k != "model_type"}))
        if lora_r:
            from peft import LoraConfig, get_peft_model
            model = get_peft_model(model, LoraConfig(r=lora_r, target_modules=["q_proj", "v_proj"]))
            return sum(p.numel() for p in model.parameters() if p.requires_grad)
    # parameters() yields the tied lm_head / embed_tokens weight once, as it is stored once
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("size, published", [("125m", 125_239_296), ("350m", 331_196_416), ("13b", N13)])
def test_parameter_count_equals_transformers(size, published):
    # the count of the built-in shape equals transformers' model of it, and the size of the released
    # checkpoint (which catches a wrong built-in shape, e.g. 350m's missing final layer norm)
    assert plan.count_params(plan.opt_config(size))[0] == meta_numel(plan.opt_config(size)) == published


def test_opt13b_rows_follow_the_zero_paper(capsys):
    result = run_json(capsys, "--model", "facebook/opt-13b", "--num-gpus", "8", "--gpu-memory", "40",
                      "--cpu-memory", "512")
    n, by = result["params"], rows(result)
    assert n == N13 and abs(n - 12.85e9) < 0.01e9
    states = {name: r["gpu_model_states_bytes"] for name, r in by.items()}
    assert states["zero3"] == pytest.approx(16 * n / 8)
    assert states["fsdp"] == pytest.approx(16 * n / 8)
    assert states["ddp"] == states["single"] == pytest.approx(16 * n)
    assert states["zero1"] == pytest.approx(4 * n + 12 * n / 8)
    assert states["zero2"] == pytest.approx(2 * n + 14 * n / 8)
    assert states["fsdp_shard_grad_op"] == pytest.approx(16 * n / 8 + 2 * n)  # 16-bit weights kept gathered
    # offload: optimizer state + fp32 gradients (16 bytes) to CPU, and for ZeRO-3 the 16-bit weights too
    assert (states["zero2_offload"], by["zero2_offload"]["cpu_per_node_bytes"]) == pytest.approx((2 * n, 16 * n))
    assert (states["zero3_offload"], by["zero3_offload"]["cpu_per_node_bytes"]) == pytest.approx((0, 18 * n))
    nvme = by["zero3_nvme"]  # the same bytes on disk; CPU keeps DeepSpeed's default pinned swap buffers
    assert (nvme["gpu_model_states_bytes"], nvme["nvme_per_node_bytes"]) == pytest.approx((0, 18 * n))
    # per GPU: 4 pinned fp32 buffers of one optimizer sub-group (the JSON's sub_group_size) and 5
    # 16-bit parameter buffers of 1e8 elements (DeepSpeed's defaults)
    sub_group = json.loads((ROOT / "ds_configs" / "zero3_nvme.json").read_text())["zero_optimization"]["sub_group_size"]
    assert nvme["cpu_per_node_bytes"] == pytest.approx(8 * (4 * 4 * sub_group + 5 * 10**8 * 2))
    layer = 12 * 5120**2 + 13 * 5120  # a decoder layer outweighs the embeddings in 13b
    assert by["zero3"]["gpu_buffers_bytes"] == 4 * layer and by["zero2"]["gpu_buffers_bytes"] == 0
    z3 = by["zero3"]
    assert z3["gpu_total_bytes"] == pytest.approx(z3["gpu_model_states_bytes"] + 4 * layer + z3["gpu_activations_bytes"])
    # 33 GiB of 40 fits with 10% headroom; zero2's 53 does not. FSDP and zero3 tie, FSDP's name comes first.
    assert [by[c]["fits"] for c in ("ddp", "zero1", "zero2", "fsdp", "zero3")] == [False, False, False, True, True]
    assert result["recommended"] == "fsdp" and result["advice"] == []


def test_activation_estimate_is_korthikanti_plus_fp32_logits(capsys):
    by = rows(run_json(capsys, "--model", "125m", "--gpu-memory", "24", "--micro-batch", "2", "--seq-len", "1024"))
    s, b, h, a, layers = 1024, 2, 768, 12, 12
    expected = layers * s * b * h * (34 + 5 * a * s / h) + b * s * 50272 * 4 * 2
    assert by["single"]["gpu_activations_bytes"] == pytest.approx(expected, abs=1)
    ckpt = rows(run_json(capsys, "--model", "125m", "--gpu-memory", "24", "--micro-batch", "2", "--seq-len", "1024",
                         "--gradient-checkpointing"))
    assert ckpt["single"]["gpu_activations_bytes"] == pytest.approx(
        layers * 2 * s * b * h + s * b * h * (34 + 5 * a * s / h) + b * s * 50272 * 8, abs=1)


# DeepSpeed's estimators (deepspeed.runtime.zero.*.estimate_*_model_states_mem_needs) differ from the
# paper's formulas in known ways; the tests require exactly these differences (to a few bytes of
# rounding), so any other disagreement fails:
# - GPU, without optimizer offload: DeepSpeed counts an fp32 gradient partition besides the 16-bit
#   gradients, 18 bytes per sharded parameter where the paper has 14 (ZeRO-2: +4N/G) or 16 (ZeRO-3:
#   +2N/G). With offload both keep only the 16-bit weights (ZeRO-2) or their ZeRO-3 shard.
# - Both add ZeRO-3's largest gathered layer, 16-bit params + grads (4 bytes each); we pass our unit.
# - CPU: additional_buffer_factor (default 1.5) is DeepSpeed's safety margin, set to 1 here: ours is
#   the 10% headroom. Without offload its CPU figure is the model being loaded, not model states, and
#   ZeRO-2 offload's max(4 * total_gpus, 16) counts every rank's fp32 copy while loading, which we
#   leave out; with 4 GPUs per node the 16 wins and the two agree.
def estimator_args(num_gpus: int, num_nodes: int) -> argparse.Namespace:
    return argparse.Namespace(num_gpus=num_gpus, num_nodes=num_nodes, optim="adamw", gpu_memory=80, cpu_memory=2048)


@pytest.mark.parametrize("gpus, nodes", [(4, 1), (8, 2)])
@pytest.mark.parametrize("offload_optimizer, offload_param", [("none", "none"), ("cpu", "none"), ("cpu", "cpu")])
def test_zero3_matches_deepspeed_estimator(gpus, nodes, offload_optimizer, offload_param):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    n, layer, embeddings = plan.count_params(plan.opt_config("13b"))
    unit = max(layer, embeddings)
    ours = plan.estimate(plan.Strategy("z3", "deepspeed", 3, offload_optimizer, offload_param), n, 0, unit, 0,
                         estimator_args(gpus, nodes))
    ds_cpu, ds_gpu, _ = estimate_zero3_model_states_mem_needs(
        n, unit, num_gpus_per_node=gpus, num_nodes=nodes, cpu_offload=offload_optimizer == "cpu",
        cpu_offload_params=offload_param == "cpu", zero_init=True, additional_buffer_factor=1.0)
    gpu = ours["gpu_model_states_bytes"] + ours["gpu_buffers_bytes"]
    assert ds_gpu - gpu == pytest.approx(0 if offload_optimizer == "cpu" else 2 * n / (gpus * nodes), abs=8)
    if offload_optimizer == "cpu":  # without offload DeepSpeed counts a model-loading copy, not model states
        assert ours["cpu_per_node_bytes"] == pytest.approx(ds_cpu, rel=1e-9)


@pytest.mark.parametrize("gpus, offload", [(4, False), (8, False), (4, True)])
def test_zero2_matches_deepspeed_estimator(gpus, offload):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    n = plan.count_params(plan.opt_config("6.7b"))[0]
    ours = plan.estimate(plan.Strategy("z2", "deepspeed", 2, "cpu" if offload else "none"), n, 0, 0, 0,
                         estimator_args(gpus, 1))
    ds_cpu, ds_gpu = estimate_zero2_model_states_mem_needs(n, num_gpus_per_node=gpus, num_nodes=1,
                                                           cpu_offload=offload, additional_buffer_factor=1.0)
    assert ds_gpu - ours["gpu_model_states_bytes"] == pytest.approx(0 if offload else 4 * n / gpus, abs=8)
    if offload:
        assert ours["cpu_per_node_bytes"] == pytest.approx(ds_cpu, rel=1e-9)


def test_json_has_a_row_per_accelerate_config_and_the_table_a_recommendation(capsys):
    result = run_json(capsys, "--model", "opt-1.3b", "--num-gpus", "2", "--gpu-memory", "80")
    assert sorted(r["config"] for r in result["rows"]) == sorted(p.stem for p in ACCELERATE_CONFIGS.glob("*.yaml"))
    by = rows(result)
    assert by["zero3_nvme"]["offload_param"] == "nvme" and by["zero2_offload"]["offload_optimizer"] == "cpu"
    assert by["fsdp_offload"]["offload_param"] == "cpu" and by["zero1"]["zero_stage"] == 1
    assert result["recommended"] == "ddp"  # 16N = 19.6 GiB fits 80; single is never chosen with 2 GPUs
    assert all(set(r) >= {"gpu_model_states_bytes", "gpu_total_gib", "cpu_per_node_gib", "fits"} for r in result["rows"])
    plan.main(["--model", "opt-1.3b", "--num-gpus", "2", "--gpu-memory", "80"])
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "recommended: ddp (accelerate_configs/ddp.yaml)"
    assert len([line for line in out if line.split()[0] in by]) == len(by)


def test_one_gpu_prefers_single_and_nothing_fits_says_what_to_try(capsys):
    assert run_json(capsys, "--model", "125m", "--gpu-memory", "24")["recommended"] == "single"
    plan.main(["--model", "66b", "--num-gpus", "8", "--gpu-memory", "16", "--cpu-memory", "64"])
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("nothing fits: try") and "--lora 8" in last and "recommended" not in last


def test_eight_bit_adam(capsys):
    result = run_json(capsys, "--model", "13b", "--num-gpus", "8", "--gpu-memory", "80", "--optim", "adamw_8bit")
    n, by = result["params"], rows(result)
    assert by["zero1"]["gpu_model_states_bytes"] == pytest.approx(4 * n + 6 * n / 8)  # K = 6
    assert by["ddp"]["gpu_model_states_bytes"] == pytest.approx(10 * n)
    # the toolkit refuses 8-bit Adam under FSDP and with DeepSpeed optimizer offload: never recommended
    assert not by["fsdp"]["fits"] and by["fsdp"]["fits_gpu"] and "refused" in by["fsdp"]["note"]
    assert not by["zero3_offload"]["fits"] and by["zero3"]["fits"]


def test_lora_trains_adapters_only(capsys):
    args = ("--model", "facebook/opt-13b", "--num-gpus", "8", "--gpu-memory", "40", "--cpu-memory", "512")
    full, lora = run_json(capsys, *args), run_json(capsys, *args, "--lora", "8")
    n, t = lora["params"], lora["trained_params"]
    assert t == 4 * 8 * 5120 * 40 and t < 0.001 * n
    by_full, by = rows(full), rows(lora)
    # frozen base: fp32 weights only under autocast (ddp), 16-bit only under DeepSpeed; adapters 16 bytes
    assert by["ddp"]["gpu_model_states_bytes"] == pytest.approx(4 * n + 16 * t)
    assert by["zero3"]["gpu_model_states_bytes"] == pytest.approx((2 * n + 16 * t) / 8)
    assert by["zero2"]["gpu_model_states_bytes"] == pytest.approx(2 * (n + t) + 14 * t / 8)  # weights stay whole
    assert by["ddp"]["gpu_model_states_bytes"] < 0.3 * by_full["ddp"]["gpu_model_states_bytes"]
    assert by["zero3"]["gpu_model_states_bytes"] < 0.15 * by_full["zero3"]["gpu_model_states_bytes"]
    assert by["zero1"]["fits"] and not by_full["zero1"]["fits"] and lora["recommended"] == "zero1"


def test_lora_count_equals_peft():
    t = plan.plan(argparse.Namespace(model="125m", lora=8, micro_batch=1, seq_len=8, gradient_checkpointing=False,
                                     num_gpus=1, num_nodes=1, optim="adamw", gpu_memory=8, cpu_memory=8))["trained_params"]
    assert t == meta_numel(plan.opt_config("125m"), lora_r=8)


def test_local_directory_with_config_json(tmp_path, capsys):
    config = dict(model_type="opt", vocab_size=1000, max_position_embeddings=256, hidden_size=64, ffn_dim=256,
                  num_hidden_layers=3, num_attention_heads=4, word_embed_proj_dim=32, enable_bias=False,
                  tie_word_embeddings=False)  # project_in/out, no biases, an untied lm_head
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = run_json(capsys, "--model", str(tmp_path), "--gpu-memory", "8")
    assert result["params"] == meta_numel(config) and result["recommended"] == "single"


def test_bad_models_are_user_errors(tmp_path, capsys):
    with pytest.raises(UserError, match="unknown model 'facebook/opt-7b'"):
        plan.main(["--model", "facebook/opt-7b", "--gpu-memory", "8"])
    with pytest.raises(UserError, match="has no config.json"):
        plan.main(["--model", str(tmp_path), "--gpu-memory", "8"])
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 768}))
    with pytest.raises(UserError, match="is a gpt2 model"):
        plan.main(["--model", str(tmp_path), "--gpu-memory", "8"])
    with pytest.raises(SystemExit) as stop:  # as the CLI reports it: one line, exit status 2
        run_cli(lambda: plan.main(["--model", "13b", "--gpu-memory", "0"]))
    assert stop.value.code == 2 and capsys.readouterr().err == "error: --gpu-memory must be > 0, got 0.0: pass a positive value\n"


def test_starts_without_torch_transformers_or_deepspeed():
    code = "import sys, toolkit.plan; print(sorted(m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
