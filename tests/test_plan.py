"""toolkit.plan: parameter counts against transformers, memory rows against the ZeRO paper's
formulas and DeepSpeed's own estimators, the CLI's JSON, inputs and errors. No process group."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from toolkit import plan
from toolkit.config import UserError, run_cli
from conftest import ACCELERATE_CONFIGS, ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from capacity import CANDIDATES  # noqa: E402

N13 = 12_853_473_280  # facebook/opt-13b, from its published shape (the meta-device test below agrees)
GIB = 2**30


def run_json(capsys, *args: str) -> dict:
    plan.main([*args, "--json"])
    return json.loads(capsys.readouterr().out)


def rows(result: dict) -> dict:
    return {r["config"]: r for r in result["rows"]}


def meta_numel(config: dict, lora_r: int = 0, targets=("q_proj", "v_proj")) -> int:
    """Parameters (or, with lora_r, trainable LoRA parameters) of the real model, built without memory."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    with torch.device("meta"):
        model = OPTForCausalLM(OPTConfig(**{k: v for k, v in config.items() if k != "model_type"}))
        if lora_r:
            from peft import LoraConfig, get_peft_model
            model = get_peft_model(model, LoraConfig(r=lora_r, target_modules=list(targets)))
            return sum(p.numel() for p in model.parameters() if p.requires_grad)
    # parameters() yields the tied lm_head / embed_tokens weight once, as it is stored once
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("size, published", [("125m", 125_239_296), ("350m", 331_196_416), ("13b", N13)])
def test_parameter_count_equals_transformers(size, published):
    # the count of the built-in shape equals transformers' model of it, and the size of the released
    # checkpoint (which catches a wrong built-in shape, e.g. 350m's missing final layer norm)
    assert plan.count_params(plan.opt_config(size))[0] == meta_numel(plan.opt_config(size)) == published


def test_opt13b_rows_in_bf16_follow_deepspeeds_counts(capsys):
    """Model states per GPU and what moves to the host or disk, 8 GPUs, bf16 (see the module doc)."""
    result = run_json(capsys, "--model", "facebook/opt-13b", "--num-gpus", "8", "--gpu-memory", "40",
                      "--cpu-memory", "512", "--mixed-precision", "bf16")
    n, by = result["params"], rows(result)
    assert n == N13 and abs(n - 12.85e9) < 0.01e9
    states = {name: r["gpu_model_states_bytes"] for name, r in by.items()}
    assert states["ddp"] == states["single"] == pytest.approx(16 * n)  # autocast: fp32 weights, gradients, moments
    assert states["fsdp"] == pytest.approx(16 * n / 8)
    assert states["fsdp_shard_grad_op"] == states["fsdp"]
    # DeepSpeed: 2-byte weights; an fp32 gradient partition, master and moments (4 + 4 + 8) sharded,
    # besides ZeRO-1/2's 16-bit gradients; ZeRO-3 accumulates gradients in bf16 (2 + 2 + 4 + 8)
    assert states["zero1"] == pytest.approx(2 * n + 2 * n + 16 * n / 8)  # 16-bit gradients whole
    assert states["zero2"] == pytest.approx(2 * n + 18 * n / 8)
    assert states["zero3"] == pytest.approx(16 * n / 8)
    # offload: gradient partition, master and moments to the host; ZeRO-3's weights too with parameter offload
    base = 8 * plan.PROCESS_BYTES
    largest = 50272 * 5120
    assert states["zero2_offload"] == pytest.approx(2 * n)
    # every process loads the fp32 model (4N) before DeepSpeed moves it: more than its 16N/8 of states
    assert by["zero2_offload"]["cpu_per_node_bytes"] - base == pytest.approx(8 * 4 * n)
    assert states["zero3_offload"] == 0 and by["zero3_offload"]["cpu_per_node_bytes"] - base == pytest.approx(16 * n)
    assert by["fsdp_offload"]["gpu_model_states_bytes"] == 0
    assert by["fsdp_offload"]["cpu_per_node_bytes"] - base == pytest.approx(16 * n + 4 * n)  # + the main process's load
    nvme = by["zero3_nvme"]  # weights, master, moments, fp32 gradients on disk; the host keeps pinned buffers
    assert (nvme["gpu_model_states_bytes"], nvme["nvme_per_node_bytes"]) == pytest.approx((0, (2 + 4 + 8 + 4) * n))
    zero = json.loads((ROOT / "ds_configs" / "zero3_nvme.json").read_text())["zero_optimization"]
    per_process = (2 * n / 8  # the bf16 gradient partition
                   + 5 * max(10**8, largest) * 2  # parameter swap buffers, "auto": the embeddings are 257M
                   + min(10**9, n / 8) * 2  # the flat 16-bit parameter buffer (max_in_cpu)
                   + 4 * 4 * max(zero["sub_group_size"], largest / 8))  # optimizer swap buffers
    assert nvme["cpu_per_node_bytes"] - base == pytest.approx(8 * per_process)
    unit = 2 * (12 * 5120**2 + 13 * 5120)  # two decoder layers outweigh the embeddings in 13b
    assert by["zero3"]["gpu_buffers_bytes"] == 4 * unit
    # ZeRO-1/2's IPG bucket: reduce_bucket_size elements in bf16, "auto" (hidden_size^2, as accelerate
    # fills it) in zero2.json, DeepSpeed's 5e8 in zero1.json, which leaves it out; ZeRO-1 all-reduces
    # a flattened copy of it
    assert by["zero2"]["gpu_buffers_bytes"] == 2 * 5120**2 and by["zero1"]["gpu_buffers_bytes"] == 2 * 2 * 5 * 10**8
    assert by["fsdp_shard_grad_op"]["gpu_buffers_bytes"] == 4 * unit + 2 * n  # 16-bit weights kept gathered
    z3 = by["zero3"]
    assert z3["gpu_total_bytes"] == pytest.approx(z3["gpu_model_states_bytes"] + 4 * unit + z3["gpu_activations_bytes"])
    # 16 bytes fit 36 GiB of 40 under FSDP and ZeRO-3, whose name comes later; ZeRO-2's do not
    assert [by[c]["fits"] for c in ("ddp", "zero1", "zero2", "fsdp", "zero3")] == [False, False, False, True, True]
    assert result["recommended"] == "fsdp" and result["advice"] == []


def test_precision_comes_from_each_config_or_the_launch_flag(capsys):
    by = rows(run_json(capsys, "--model", "13b", "--num-gpus", "8", "--gpu-memory", "80", "--cpu-memory", "1024"))
    n = N13
    # fsdp.yaml says bf16; the DeepSpeed configs leave it to the launch, fp32 by default: 4-byte weights,
    # and ZeRO-3's fp32 partitions are the masters themselves
    assert by["fsdp"]["mixed_precision"] == "bf16" and by["zero3"]["mixed_precision"] == "no"
    assert by["zero3"]["gpu_model_states_bytes"] == pytest.approx(16 * n / 8)
    assert by["zero2"]["gpu_model_states_bytes"] == pytest.approx(4 * n + 20 * n / 8)
    fp16 = rows(run_json(capsys, "--model", "13b", "--num-gpus", "8", "--gpu-memory", "80", "--cpu-memory", "1024",
                         "--mixed-precision", "fp16"))
    assert fp16["zero3"]["gpu_model_states_bytes"] == pytest.approx(16 * n / 8)
    assert fp16["fsdp"]["launch"].split()[-5:-3] == ["--mixed_precision", "fp16"]


def test_activations_are_korthikanti_without_attention_scores_and_the_fused_loss(capsys):
    args = ("--model", "125m", "--gpu-memory", "24", "--micro-batch", "2", "--seq-len", "1024")
    by = rows(run_json(capsys, *args, "--mixed-precision", "bf16"))
    s, b, h, layers, vocab = 1024, 2, 768, 12, 50272
    loss = min(b * s * vocab * 4, 256 * 2**20) + b * s * h * 4 + vocab * h * 4  # a logits chunk, two gradients
    assert by["single"]["gpu_activations_bytes"] == pytest.approx(layers * 34 * s * b * h + loss, abs=1)
    assert rows(run_json(capsys, *args, "--mixed-precision", "no"))["single"]["gpu_activations_bytes"] == \
        pytest.approx(layers * 68 * s * b * h + loss, abs=1)  # fp32 activations: twice the bytes
    ckpt = rows(run_json(capsys, *args, "--mixed-precision", "bf16", "--gradient-checkpointing"))
    assert ckpt["single"]["gpu_activations_bytes"] == pytest.approx(layers * 2 * s * b * h + 34 * s * b * h + loss, abs=1)
    lora = rows(run_json(capsys, *args, "--mixed-precision", "bf16", "--lora", "8"))  # a frozen head keeps no gradient
    assert lora["single"]["gpu_activations_bytes"] == pytest.approx(layers * 34 * s * b * h + loss - vocab * h * 4, abs=1)


def capacity_job(row: dict) -> tuple:
    """The planner's job for a row of benchmarks/capacity.json, as capacity.py launched it (micro
    batch 1 x 128, fp32 unless the candidate says, a built-in preset on CPU)."""
    candidate = CANDIDATES[row["strategy"]]
    optim = next((o.split("=")[1] for o in candidate.overrides if o.startswith("optim.name=")), "adamw")
    model, preset = plan.resolve_model(row["shape"])
    job = plan.Job(name=row["shape"], model=model, preset=preset, micro_batch=1, seq_len=128, checkpointing=False, optim=optim, lora_r=0,
                   lora_targets=[], mixed_precision=candidate.mixed_precision, gpus=candidate.processes, nodes=1,
                   device="cpu")
    n, layer, embeddings = plan.count_params(model)
    row_plan = plan.estimate(plan.read_strategy(ACCELERATE_CONFIGS / f"{candidate.config}.yaml"), job,
                             (n, n, max(2 * layer, embeddings)), plan.largest_parameter_numel(model))
    return candidate, row_plan




def test_the_plan_is_within_a_quarter_of_every_measured_capacity_row():
    """Each rank's peak resident memory at start and in training (benchmarks/capacity.json, measured
    on this machine's CPU) against the planner's per-process figure for the same run; a candidate
    that ran out of memory must be planned over the limit it met. 25%: the issue's bound. The
    planner leaves out allocator slack, the data loader and copies inside collectives beyond gloo's
    all-gather output and ZeRO-1's flattened bucket, so it reads up to 20% low (zero2_offload); FSDP
    without reshard reads 19% high (its gathered weights counted whole for the whole step, while
    FSDP2 frees them layer by layer in backward)."""
    capacity = json.loads((ROOT / "benchmarks" / "capacity.json").read_text())
    checked = []
    for row in capacity["rows"]:
        candidate, planned = capacity_job(row)
        start, training = planned["host_start_bytes"] / GIB, planned["host_training_bytes"] / GIB
        if row["trains"]:
            for what, planned_gb, measured in (("start", start, row["start_peak_gb"]),
                                               ("training", training, row["training_peak_gb"])):
                assert planned_gb == pytest.approx(max(measured), rel=0.25), (row["strategy"], row["shape"], what)
            checked.append((row["strategy"], row["shape"]))
            if "nvme_gb" in row:  # the swap files on disk after training (GB = 1e9 bytes)
                assert planned["nvme_per_node_bytes"] / 1e9 == pytest.approx(row["nvme_gb"], rel=0.05), row["shape"]
        else:
            assert candidate.processes * max(start, training) > capacity["memory_limit_gb"], (row["strategy"], row["shape"])
    assert len(checked) >= 9 and ("zero3_nvme, bf16, 1 process", "random-opt-2.7b") in checked
    assert {"zero1", "zero2", "zero2_offload", "fsdp_shard_grad_op"} <= {strategy for strategy, _ in checked}


# DeepSpeed's estimators (deepspeed.runtime.zero.*.estimate_*_model_states_mem_needs), bf16: the
# tests require these agreements to a few bytes, and the differences below exactly:
# - GPU: the same 2 + 18/G bytes per parameter under ZeRO-2. Under ZeRO-3 the estimator counts an
#   fp32 gradient partition (18/G); DeepSpeed 0.19 accumulates ZeRO-3 gradients in the model's dtype
#   unless the JSON says "data_types": {"grad_accum_dtype": "fp32"} (engine.get_data_types), so ours
#   is 16/G, and 18/G with that setting. Plus ZeRO-3's largest gathered layer (16-bit weights and
#   gradients, 4 bytes each), for which we pass our unit.
# - CPU: additional_buffer_factor (default 1.5) is DeepSpeed's safety margin, set to 1 here: ours is
#   the 10% headroom. DeepSpeed leaves out the process itself (PROCESS_BYTES per process here). With
#   offload both count the offloaded states per node (the gradient partition as above); ZeRO-2's
#   max(4 * total_gpus, 16) is the larger of every process's fp32 copy while loading and the states,
#   as ours is, whose states add the 16-bit copy of each stepped partition (2 per node). Without
#   offload its CPU figure is only the model loading: whole per GPU (ZeRO-2),
#   one layer per GPU under zero.Init (ZeRO-3), for which we pass our largest parameter.
def estimator_job(gpus: int, nodes: int) -> plan.Job:
    return plan.Job(name="facebook/opt-13b", model=plan.opt_config("13b"), preset=False, micro_batch=1, seq_len=1,
                    checkpointing=False, optim="adamw", lora_r=0, lora_targets=[], mixed_precision="bf16", gpus=gpus,
                    nodes=nodes, device="cuda")


@pytest.mark.parametrize("fp32_grad_accum", [False, True])
@pytest.mark.parametrize("gpus, nodes", [(4, 1), (8, 2)])
@pytest.mark.parametrize("offload_optimizer, offload_param", [("none", "none"), ("cpu", "none"), ("cpu", "cpu")])
def test_zero3_matches_deepspeed_estimator(gpus, nodes, offload_optimizer, offload_param, fp32_grad_accum):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    n, layer, embeddings = plan.count_params(plan.opt_config("13b"))
    unit, largest = max(2 * layer, embeddings), plan.largest_parameter_numel(plan.opt_config("13b"))
    strategy = plan.Strategy("z3", "deepspeed", 3, offload_optimizer, offload_param, fp32_grad_accum=fp32_grad_accum,
                             sharded_at_birth=True)
    ours = plan.estimate(strategy, estimator_job(gpus, nodes), (n, n, unit), largest)
    ds_cpu, ds_gpu, _ = estimate_zero3_model_states_mem_needs(
        n, unit, num_gpus_per_node=gpus, num_nodes=nodes, cpu_offload=offload_optimizer == "cpu",
        cpu_offload_params=offload_param == "cpu", zero_init=True, additional_buffer_factor=1.0)
    fp32_grads_left_out = 0 if fp32_grad_accum else 2 * n / (gpus * nodes)  # per process
    on_gpu = fp32_grads_left_out if offload_optimizer == "none" else 0
    assert ds_gpu - (ours["gpu_model_states_bytes"] + ours["gpu_buffers_bytes"]) == pytest.approx(on_gpu, abs=8)
    ours_cpu = ours["cpu_per_node_bytes"] - gpus * plan.PROCESS_BYTES
    if offload_optimizer == "none":  # DeepSpeed: one layer loading per GPU; ours: one parameter
        ds_cpu = estimate_zero3_model_states_mem_needs(n, largest, gpus, nodes, False, False, True, 1.0)[0]
    assert ds_cpu - ours_cpu == pytest.approx(gpus * (fp32_grads_left_out - on_gpu), rel=1e-9, abs=64)


@pytest.mark.parametrize("gpus, offload", [(4, False), (8, False), (2, True), (4, True), (8, True)])
def test_zero2_matches_deepspeed_estimator(gpus, offload):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    n = plan.count_params(plan.opt_config("6.7b"))[0]
    ours = plan.estimate(plan.Strategy("z2", "deepspeed", 2, "cpu" if offload else "none"), estimator_job(gpus, 1),
                         (n, n, 0), 0)
    ds_cpu, ds_gpu = estimate_zero2_model_states_mem_needs(n, num_gpus_per_node=gpus, num_nodes=1,
                                                           cpu_offload=offload, additional_buffer_factor=1.0)
    assert ours["gpu_model_states_bytes"] == pytest.approx(ds_gpu, abs=8)
    # DeepSpeed's CPU figure is the larger of each process's load (4N) and the offloaded states
    # (16N per node); ours adds the 16-bit copy each process keeps of its stepped partition (2N per
    # node, param_buffer_of_bit16_for_cpu_offload_groups), which shows where the states outweigh the load
    expected = max(ds_cpu, 18 * n) if offload else ds_cpu
    assert ours["cpu_per_node_bytes"] - gpus * plan.PROCESS_BYTES == pytest.approx(expected, rel=1e-9)


def test_deepspeeds_flattening_copy_counts_at_start_on_cpu_only(capsys):
    """ZeRO-1/2 copy the module's weights into one flat buffer at start: on CPU both are in the one
    memory (measured: capacity.json), on a GPU DeepSpeed does it there only when both fit and
    otherwise flattens on the host, so it never decides whether a GPU fits. 6.7b, bf16, 16 GPUs:
    ZeRO-2's start is its 2-byte weights, fp32 gradient partition and master."""
    args = ("--model", "6.7b", "--num-gpus", "16", "--mixed-precision", "bf16", "--cpu-memory", "1024")
    gpu = rows(run_json(capsys, *args, "--gpu-memory", "32"))["zero2"]
    n = plan.count_params(plan.opt_config("6.7b"))[0]
    assert gpu["gpu_start_bytes"] == pytest.approx(2 * n + 8 * n / 16) and gpu["fits"]
    cpu = rows(run_json(capsys, *args, "--device", "cpu"))["zero2"]
    assert cpu["host_start_bytes"] - plan.PROCESS_BYTES == pytest.approx(2 * n + 2 * n + 8 * n / 16)


def test_json_has_a_row_per_accelerate_config_and_the_table_a_launch_command(capsys):
    args = ("--model", "opt-1.3b", "--num-gpus", "2", "--gpu-memory", "80", "--cpu-memory", "64")
    result = run_json(capsys, *args)
    assert sorted(r["config"] for r in result["rows"]) == sorted(p.stem for p in ACCELERATE_CONFIGS.glob("*.yaml"))
    by = rows(result)
    assert by["zero3_nvme"]["offload_param"] == "nvme" and by["zero2_offload"]["offload_optimizer"] == "cpu"
    assert by["fsdp_offload"]["offload_param"] == "cpu" and by["zero1"]["zero_stage"] == 1
    assert result["recommended"] == "ddp"  # 16N = 19.6 GiB fits 80; single is never chosen with 2 GPUs
    assert all(set(r) >= {"gpu_model_states_bytes", "gpu_total_gib", "cpu_per_node_gib", "fits", "launch"}
               for r in result["rows"])
    plan.main(list(args))
    out = capsys.readouterr().out.splitlines()
    assert out[-2:] == ["recommended: ddp", "  accelerate launch --config_file accelerate_configs/ddp.yaml --num_processes 2 "
                        "--num_machines 1 -m toolkit.train model.name_or_path=facebook/opt-1.3b"]
    assert len([line for line in out if line.split()[0] in by]) == len(by)


def test_host_memory_counts_each_process_loading_the_model(capsys):
    """6.7b on 8 x 80 GiB: every DDP / ZeRO-1 process builds the fp32 model (27 GB) on the host before
    moving it; a 24 GiB host cannot, a 256 GiB one can, and ZeRO-3's zero.Init needs no such copy."""
    args = ("--model", "6.7b", "--num-gpus", "8", "--gpu-memory", "80", "--mixed-precision", "bf16")
    small = run_json(capsys, *args, "--cpu-memory", "24")
    n = small["params"]
    by = rows(small)
    assert by["zero1"]["fits_gpu"] and not by["zero1"]["fits_cpu"]
    assert by["zero1"]["host_start_bytes"] == plan.PROCESS_BYTES + 4 * n
    zero1 = rows(run_json(capsys, *args, "--cpu-memory", "24", "--accelerate-config", str(ACCELERATE_CONFIGS / "zero1.yaml")))
    needed = 8 * (plan.PROCESS_BYTES + 4 * n) / 0.9 / GIB
    assert small["recommended"] == "zero3" and small["advice"] == [] and zero1["zero1"]["note"] is None
    assert f"--cpu-memory {needed:.0f} or more (zero1)" == run_json(
        capsys, *args, "--cpu-memory", "24", "--accelerate-config", str(ACCELERATE_CONFIGS / "zero1.yaml"))["advice"][0]
    assert run_json(capsys, *args, "--cpu-memory", "256")["recommended"] == "zero1"
    # a preset is built sharded at birth: no loading copy
    preset = rows(run_json(capsys, *args[2:], "--model", "random-opt-6.7b", "--cpu-memory", "24"))
    assert preset["zero3"]["host_start_bytes"] < by["zero3"]["host_start_bytes"]


def test_cpu_memory_not_given_is_stated_as_this_machines(capsys):
    result = run_json(capsys, "--model", "125m", "--gpu-memory", "24")
    assert result["cpu_memory_assumed"] and result["cpu_memory_gib"] > 0
    plan.main(["--model", "125m", "--gpu-memory", "24"])
    assert "(assumed: this machine's; pass --cpu-memory for the training nodes)" in capsys.readouterr().out
    assert not run_json(capsys, "--model", "125m", "--gpu-memory", "24", "--cpu-memory", "8")["cpu_memory_assumed"]


def test_hsdp_is_sized_from_the_gpu_count(capsys):
    two_nodes = rows(run_json(capsys, "--model", "13b", "--num-gpus", "4", "--num-nodes", "2", "--gpu-memory", "80",
                              "--cpu-memory", "512"))
    hsdp, fsdp = two_nodes["hsdp"], two_nodes["fsdp"]
    assert hsdp["gpu_model_states_bytes"] == pytest.approx(16 * N13 / 4)  # sharded over a node's 4 GPUs
    assert fsdp["gpu_model_states_bytes"] == pytest.approx(16 * N13 / 8)
    assert "--parallelism_config_dp_shard_size 4 --parallelism_config_dp_replicate_size 2" in hsdp["launch"]
    assert "--machine_rank $NODE_RANK --main_process_ip $MAIN_HOST" in hsdp["launch"]
    one_node = rows(run_json(capsys, "--model", "125m", "--gpu-memory", "80", "--cpu-memory", "64"))
    assert not one_node["hsdp"]["fits"] and "on one node it is fsdp" in one_node["hsdp"]["note"]


def test_run_and_accelerate_configs_are_read(tmp_path, capsys):
    run = tmp_path / "run.yaml"
    run.write_text("data:\n  train: data/train.jsonl\n  block_size: 512\nmodel:\n  name_or_path: facebook/opt-1.3b\n  gradient_checkpointing: true\n"
                   "train:\n  micro_batch_size: 2\noptim:\n  name: adamw_8bit\n"
                   "lora:\n  enabled: true\n  r: 16\n  target_modules: [q_proj, k_proj, v_proj, out_proj, fc1, fc2]\n")
    zero3 = ACCELERATE_CONFIGS / "zero3.yaml"
    result = run_json(capsys, "--config", str(run), "--accelerate-config", str(zero3), "--gpu-memory", "24",
                      "--cpu-memory", "64", "--mixed-precision", "bf16")
    config = plan.opt_config("1.3b")
    assert (result["micro_batch"], result["seq_len"], result["optim"], result["gradient_checkpointing"]) == \
        (2, 512, "adamw_8bit", True)
    assert result["trained_params"] == meta_numel(config, 16, result["lora_targets"]) and result["lora_r"] == 16
    assert [r["config"] for r in result["rows"]] == ["zero3"] and result["num_gpus"] == 2  # zero3.yaml's processes
    assert result["launch"] == (f"accelerate launch --config_file {os.path.relpath(zero3)} --num_processes 2 "
                                f"--num_machines 1 --mixed_precision bf16 -m toolkit.train --config {run}")
    flag = run_json(capsys, "--config", str(run), "--accelerate-config", str(zero3), "--gpu-memory", "24",
                    "--micro-batch", "4", "--lora", "0")
    assert flag["launch"].endswith(f"--config {run} train.micro_batch_size=4 lora.enabled=false")
    assert flag["trained_params"] == flag["params"]


def test_eight_bit_adam(capsys):
    for optim in ("adamw_8bit", "paged_adamw_8bit"):
        result = run_json(capsys, "--model", "13b", "--num-gpus", "8", "--gpu-memory", "80", "--cpu-memory", "1024",
                          "--optim", optim, "--mixed-precision", "bf16")
        n, by = result["params"], rows(result)
        assert by["zero3"]["gpu_model_states_bytes"] == pytest.approx((2 + 2 + 4 + 2) * n / 8)  # 2 bytes of moments
        assert by["ddp"]["gpu_model_states_bytes"] == pytest.approx(10 * n)
        # the toolkit refuses 8-bit Adam under FSDP and with DeepSpeed optimizer offload: never recommended
        assert not by["fsdp"]["fits"] and by["fsdp"]["fits_gpu"] and "refused" in by["fsdp"]["note"]
        assert not by["zero3_offload"]["fits"] and by["zero3"]["fits"]


def test_lora_trains_adapters_only(capsys):
    args = ("--model", "facebook/opt-13b", "--num-gpus", "8", "--gpu-memory", "40", "--cpu-memory", "512",
            "--mixed-precision", "bf16")
    full, lora = run_json(capsys, *args), run_json(capsys, *args, "--lora", "8")
    n, t = lora["params"], lora["trained_params"]
    assert t == 4 * 8 * 5120 * 40 and t < 0.001 * n
    by_full, by = rows(full), rows(lora)
    # frozen base: bf16 under DDP's autocast (runtime.param_dtypes) and DeepSpeed; adapters 16 bytes
    # (ZeRO-3: a bf16 weight like the base's, a bf16 gradient, the fp32 master and moments)
    assert by["ddp"]["gpu_model_states_bytes"] == pytest.approx(2 * (n - t) + 16 * t)
    assert by["zero3"]["gpu_model_states_bytes"] == pytest.approx((2 * n + 14 * t) / 8)
    assert by["ddp"]["gpu_model_states_bytes"] < 0.15 * by_full["ddp"]["gpu_model_states_bytes"]
    assert lora["recommended"] == "ddp" and full["recommended"] == "fsdp"


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]])
def test_lora_count_equals_peft(targets, capsys):
    result = run_json(capsys, "--model", "125m", "--gpu-memory", "8", "--lora", "8", "--lora-targets", ",".join(targets))
    assert result["trained_params"] == meta_numel(plan.opt_config("125m"), 8, targets)


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
    with pytest.raises(UserError, match="LoRA target lm_head is not an OPT linear layer"):
        plan.main(["--model", "125m", "--gpu-memory", "8", "--lora", "8", "--lora-targets", "q_proj,lm_head"])
    with pytest.raises(UserError, match="--gpu-memory is required"):
        plan.main(["--model", "125m"])
    with pytest.raises(UserError, match="no model: pass --model"):
        plan.main(["--gpu-memory", "8"])
    with pytest.raises(UserError, match="--accelerate-config nowhere.yaml does not exist"):
        plan.main(["--model", "125m", "--gpu-memory", "8", "--accelerate-config", "nowhere.yaml"])
    with pytest.raises(UserError, match="config file nowhere.yaml does not exist"):
        plan.main(["--config", "nowhere.yaml", "--gpu-memory", "8"])
    with pytest.raises(SystemExit) as stop:  # as the CLI reports it: one line, exit status 2
        run_cli(lambda: plan.main(["--model", "13b", "--gpu-memory", "0"]))
    assert stop.value.code == 2 and capsys.readouterr().err == "error: --gpu-memory must be > 0, got 0.0: pass a positive value\n"


def test_starts_without_torch_transformers_or_deepspeed():
    code = "import sys, toolkit.plan; print(sorted(m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
