"""Every accelerate config trains the same model: parametrized over the config files themselves.

Each runs 2 real processes on gloo in fp32, checkpoints at step 2, restarts from it to step 4,
and is compared with an uninterrupted DDP run at the same global batch."""

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import (ACCELERATE_CONFIGS, ROOT, environment, free_port, jemalloc_library, launch, metrics, runtime,
                      tiny_run)
from toolkit import export, strategy
from toolkit.config import RunConfig, UserError

# hsdp runs on 4 processes (2 replicas x 2 shards): test_hsdp_trains_resumes_and_exports_like_ddp
CONFIGS = sorted(p.stem for p in ACCELERATE_CONFIGS.glob("*.yaml") if p.stem not in ("single", "ddp", "hsdp"))
# Clipping at 0.5 is active on every step (norms are ~1), so every strategy must clip the same way.
ARGS = {"train.micro_batch_size": 2, "train.grad_accum_steps": 2, "checkpoint.keep_last": 0,
        "optim.max_grad_norm": 0.5}
# fp32 everywhere: sharded strategies reduce the same gradients in a different order (reduce-
# scatter by buckets vs one all-reduce) and DeepSpeed's Adam fuses differently from torch's; over
# 4 steps that stays below 1e-5 relative in the loss and 1e-4 in the weights (measured ~1e-7 and
# ~5e-7), while a normalisation or sync bug moves them by 1e-2 or more.
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 1e-4
# Evaluations at steps 0, 2 and 4, each with greedy samples (every rank generates under ZeRO-3 and FSDP).
SAMPLES = {"eval.every": 2, "eval.sample_prompts": "[The,A function]", "eval.sample_max_new_tokens": 8}


def expected(name: str) -> dict:
    """What the config file asks for, read from the file itself."""
    acc = yaml.safe_load((ACCELERATE_CONFIGS / f"{name}.yaml").read_text())
    if acc["distributed_type"] == "DEEPSPEED":
        ds = json.loads((ROOT / acc["deepspeed_config"]["deepspeed_config_file"]).read_text())["zero_optimization"]
        return {"distributed_type": "DEEPSPEED", "zero_stage": ds["stage"],
                "offload_optimizer": ds.get("offload_optimizer", {}).get("device", "none"),
                "offload_param": ds.get("offload_param", {}).get("device", "none")}
    fsdp = acc["fsdp_config"]
    return {"distributed_type": "FSDP", "fsdp_version": fsdp["fsdp_version"],
            "reshard_after_forward": fsdp["fsdp_reshard_after_forward"], "offload_param": fsdp["fsdp_offload_params"]}


@pytest.fixture(scope="module")
def ddp_run(text_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_ref")
    launch("toolkit.train", tiny_run(text_data, out, **ARGS, **SAMPLES, **{"checkpoint.every": 2}), config="ddp",
           extra=["--mixed_precision", "no"])
    return out


def samples(out: Path) -> list[tuple]:
    return [(r["step"], r["prompt"], r["completion"]) for r in map(json.loads, (out / "samples.jsonl").open())]


@pytest.mark.distributed
def test_samples_are_the_trained_models_greedy_continuations(ddp_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert [(step, prompt) for step, prompt, _ in samples(ddp_run)] == \
        [(step, prompt) for step in (0, 2, 4) for prompt in ("The", "A function")]
    model = AutoModelForCausalLM.from_pretrained(ddp_run / "final")
    tokenizer = AutoTokenizer.from_pretrained(ddp_run / "final")
    for step, prompt, completion in samples(ddp_run)[-2:]:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert completion == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert len({completion for _, _, completion in samples(ddp_run)}) > 2  # training changes what it writes


@pytest.mark.distributed
@pytest.mark.parametrize("name", CONFIGS)
def test_config_trains_resumes_and_exports_like_ddp(name, ddp_run, text_data, tmp_path):
    out = tmp_path / name
    extra = ["--mixed_precision", "no"]
    if expected(name).get("offload_optimizer") == "nvme":
        # Optimizer sub-groups of 270K elements per rank: tiny-opt's first (of its 362K) is swapped
        # to disk, its last (92K) stays in memory, as DeepSpeed keeps any under 1 MiB per rank (a
        # real model's last few parameters: opt-1.3b's final layer norm). The checkpoint holds both.
        ds = json.loads((ROOT / "ds_configs" / f"{name}.json").read_text())
        ds["zero_optimization"]["sub_group_size"] = 270_000
        (tmp_path / "ds.json").write_text(json.dumps(ds))
        extra += ["--deepspeed_config_file", str(tmp_path / "ds.json")]
    for steps, resume in ((2, "none"), (4, "auto")):
        launch("toolkit.train", tiny_run(text_data, out, **ARGS, **SAMPLES, **{"train.max_steps": steps,
                                                                               "checkpoint.every": 2, "resume": resume}),
               config=name, extra=extra)

    info = runtime(out)
    assert info["num_processes"] == 2 and info["mixed_precision"] == "no"
    # the same greedy text at every evaluation (the step-4 one after the restart, written once)
    assert samples(out) == samples(ddp_run)
    assert {k: info[k] for k in expected(name)} == expected(name)

    # Steps 3 and 4 follow the restart: its optimizer state must be restored as well as the weights
    # (a zero3_nvme resume that restarted Adam's moments from zero was 6e-4 off in the loss, 3% in the norm).
    ours, ddp = metrics(out)[0], metrics(ddp_run)[0]
    assert [r["step"] for r in ours] == [1, 2, 3, 4]
    for a, b in zip(ddp, ours):
        assert b["loss"] == pytest.approx(a["loss"], rel=LOSS_RTOL), (name, a["step"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3), (name, a["step"])

    # sharding is real: parameters (FSDP, ZeRO-3) and optimizer state (all) about halved per rank
    ddp_state = ddp[-1]["optim_state_numel"]
    assert ours[-1]["optim_state_numel"] <= 0.55 * ddp_state
    if info.get("zero_stage", 3) == 3:
        assert info["params_local_numel"] <= 0.55 * info["params_numel"]
    if info.get("zero_stage") == 3 and info["offload_optimizer"] == "none":
        # fp32 parameters are their own masters: no second fp32 copy of the shard
        assert info["zero3_fp32_masters"] == "the parameters"

    if expected(name)["offload_param"] == "nvme":
        # ZeRO-3 swaps parameters into the run's own folder (it once used ./none, accelerate's placeholder)
        assert any((out / "nvme_offload").rglob("float32params")) and not (ROOT / "none").exists()

    # the final export and an export of the step-4 checkpoint (toolkit.export) both equal DDP's weights
    step_4 = ["--checkpoint", str(out / "checkpoints" / "step-000004"), "--out", str(tmp_path / "exported")]
    export.main(step_4)
    assert_same_weights(ddp_run / "final", out / "final", tmp_path / "exported")


@pytest.mark.distributed
def test_hsdp_trains_resumes_and_exports_like_ddp(text_data, tmp_path):
    """FSDP2 hybrid shard on 4 CPU processes (dp_replicate 2 x dp_shard 2, accelerate's parallelism_config):
    every parameter lives on the 2-D mesh as (Replicate(), Shard(0)), holds half the model per rank,
    and trains, resumes and exports like DDP on 4 processes with the same global batch."""
    four = ["--mixed_precision", "no", "--num_processes", "4"]
    ddp = tmp_path / "ddp4"
    launch("toolkit.train", tiny_run(text_data, ddp, **ARGS), config="ddp", extra=four)
    out = tmp_path / "hsdp"
    for steps, resume in ((2, "none"), (4, "auto")):
        launch("toolkit.train", tiny_run(text_data, out, **ARGS, **{"train.max_steps": steps, "checkpoint.every": 2,
                                                                    "resume": resume}),
               config="hsdp", extra=["--mixed_precision", "no"])

    info = runtime(out)
    assert info["num_processes"] == 4 and info["distributed_type"] == "FSDP"
    assert info["fsdp_mesh"] == {"dp_replicate": 2, "dp_shard_cp": 2}
    assert info["fsdp_placements"] == ["R", "S(0)"] and info["fsdp_mesh_backend"] == "gloo"
    assert info["params_local_numel"] == info["params_numel"] // 2  # sharded over 2, not 4
    ours, reference = metrics(out)[0], metrics(ddp)[0]
    assert [r["step"] for r in ours] == [1, 2, 3, 4]
    for a, b in zip(reference, ours):
        assert b["loss"] == pytest.approx(a["loss"], rel=LOSS_RTOL), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3), a["step"]
    export.main(["--checkpoint", str(out / "checkpoints" / "step-000004"), "--out", str(tmp_path / "exported")])
    assert_same_weights(ddp / "final", out / "final", tmp_path / "exported")


@pytest.mark.distributed
@pytest.mark.parametrize("name, setting", [("zero2", "jemalloc, keeps freed blocks"),  # every rank holds the model
                                           ("fsdp", "jemalloc, keeps freed blocks over 8 MiB")])  # opt.oversize_threshold
def test_a_launch_preloading_jemalloc_sets_it_for_its_strategy_and_trains_like_ddp(name, setting, ddp_run, text_data,
                                                                                 tmp_path):
    """The allocator moves speed and memory, never the numbers."""
    out = tmp_path / name
    launch("toolkit.train", tiny_run(text_data, out, **ARGS), config=name, extra=["--mixed_precision", "no"],
           env={"LD_PRELOAD": jemalloc_library()})
    assert runtime(out)["cpu_allocator"] == setting
    for a, b in zip(metrics(ddp_run)[0], metrics(out)[0], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=LOSS_RTOL), a["step"]


def assert_same_weights(reference_dir: Path, *dirs: Path, atol: float = WEIGHT_ATOL) -> None:
    reference = load_file(reference_dir / "model.safetensors")
    for exported in dirs:
        weights = load_file(exported / "model.safetensors")
        # the same files whatever the strategy: names (the tied lm_head stored once, as the
        # embedding), dtypes and values
        assert {k: v.dtype for k, v in weights.items()} == {k: v.dtype for k, v in reference.items()}, exported
        assert "lm_head.weight" not in weights
        for key, value in weights.items():
            torch.testing.assert_close(value, reference[key], rtol=0, atol=atol, msg=f"{exported} {key}")


@pytest.fixture(scope="module")
def born_runs(text_data, tmp_path_factory):
    """small-opt (77M parameters, 308 MB in fp32, its largest parameter 4 MB) for one step under
    DDP, ZeRO-3 and FSDP: the start memory of each rank, phase by phase."""
    runs = {}
    for name in ("ddp", "zero3", "fsdp"):
        runs[name] = out = tmp_path_factory.mktemp(f"born_{name}")
        launch("toolkit.train", tiny_run(text_data, out, **{
            "model.name_or_path": "small-opt", "data.block_size": 32, "train.micro_batch_size": 1,
            "train.max_steps": 1, "eval.every": 0, "eval.max_batches": 1, "checkpoint.max_shard_size": "20MB"}),
            config=name, extra=["--mixed_precision", "no"])
    return runs


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["zero3", "fsdp"])
def test_a_sharded_strategy_never_holds_the_whole_model_on_a_rank(name, born_runs):
    """Building and placing the model adds to each rank's peak resident memory about its shard
    (half the model) plus the largest parameter; a whole-model build, as DDP's, adds at least the
    whole model. 0.75 lies between: 0.5 + the 4 MB parameter + allocator slack, and 1.0."""
    whole_gb = runtime(born_runs["ddp"])["params_numel"] * 4 / 2**30

    def build_growth(run):
        memory = runtime(run)["memory_at_start_gb"]
        return [built - before for built, before in zip(memory["model_built"], memory["before_model"])]

    assert all(g >= 0.95 * whole_gb for g in build_growth(born_runs["ddp"])), (build_growth(born_runs["ddp"]), whole_gb)
    for rank, growth in enumerate(build_growth(born_runs[name])):
        assert 0.4 * whole_gb < growth < 0.75 * whole_gb, (name, rank, growth, whole_gb)
    # born sharded, from the same seed: the same initial model (the first loss, before any update)
    assert metrics(born_runs[name])[0][0]["loss"] == pytest.approx(metrics(born_runs["ddp"])[0][0]["loss"],
                                                                  rel=LOSS_RTOL)


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["ddp", "zero3", "fsdp"])
def test_the_export_gathers_one_parameter_at_a_time(name, born_runs):
    """Writing final/ raises no rank's peak resident memory above its training peak by more than a
    shard (20 MB here) and the parameter being gathered (4 MB); gathering the whole model first (308 MB
    on rank 0, as accelerate's get_state_dict does) would. Half the model lies between the two."""
    whole_gb = runtime(born_runs["ddp"])["params_numel"] * 4 / 2**30
    summary = json.loads((born_runs[name] / "summary.json").read_text())
    for rank, (export, training) in enumerate(zip(summary["export_peak_mem_gb_per_rank"],
                                                  summary["peak_mem_gb_per_rank"], strict=True)):
        assert export - training < 0.5 * whole_gb, (name, rank, export, training, whole_gb)
    assert len(list((born_runs[name] / "final").glob("model-*-of-*.safetensors"))) > 10  # in shards


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["zero3", "fsdp"])
def test_a_checkpoint_loads_sharded_and_trains_like_ddp(name, ddp_run, text_data, tmp_path):
    """From a local checkpoint (DDP's export): ZeRO-3 loads it into partitions and FSDP on the
    main process only (fsdp_cpu_ram_efficient_loading), which broadcasts it while sharding."""
    runs = {}
    for config in ("ddp", name):
        runs[config] = out = tmp_path / config
        launch("toolkit.train", tiny_run(text_data, out, **ARGS, **{"model.name_or_path": ddp_run / "final",
                                                                    "train.max_steps": 2}),
               config=config, extra=["--mixed_precision", "no"])
    for a, b in zip(metrics(runs["ddp"])[0], metrics(runs[name])[0], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=LOSS_RTOL)
    assert metrics(runs[name])[0][0]["loss"] < metrics(ddp_run)[0][0]["loss"]  # it starts from the trained model


WIZARD_DEEPSPEED = """\
compute_environment: LOCAL_MACHINE
debug: false
deepspeed_config:
  gradient_accumulation_steps: 1
  gradient_clipping: 1.0
  offload_optimizer_device: none
  offload_param_device: none
  zero3_init_flag: false
  zero_stage: 2
distributed_type: DEEPSPEED
downcast_bf16: 'no'
enable_cpu_affinity: false
machine_rank: 0
main_training_function: main
mixed_precision: 'no'
num_machines: 1
num_processes: 2
rdzv_backend: static
same_network: true
tpu_env: []
tpu_use_cluster: false
tpu_use_sudo: false
use_cpu: false
"""


@pytest.mark.distributed
def test_a_deepspeed_config_from_the_wizard_runs_unchanged(ddp_run, text_data, tmp_path):
    """`accelerate config` writes DeepSpeed settings inline (no JSON), with its own accumulation
    (1) and clipping: the run config still decides them, so the result equals DDP's."""
    (tmp_path / "wizard.yaml").write_text(WIZARD_DEEPSPEED)
    out = tmp_path / "run"
    launch("toolkit.train", tiny_run(text_data, out, **ARGS), config=str(tmp_path / "wizard"))
    info = runtime(out)
    assert info["distributed_type"] == "DEEPSPEED" and info["zero_stage"] == 2 and info["num_processes"] == 2
    for a, b in zip(metrics(ddp_run)[0], metrics(out)[0]):
        assert b["loss"] == pytest.approx(a["loss"], rel=LOSS_RTOL)


@pytest.mark.distributed
def test_two_machines_on_loopback(ddp_run, text_data, tmp_path):
    """num_machines: 2, one process each, both on this machine: the launches meet over 127.0.0.1."""
    port = free_port()
    config = yaml.safe_load((ACCELERATE_CONFIGS / "ddp.yaml").read_text())
    config.update(num_machines=2, num_processes=2, main_process_ip="127.0.0.1", main_process_port=port,
                  mixed_precision="no")
    (tmp_path / "two_machines.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(launch, "toolkit.train", tiny_run(text_data, out, **ARGS),
                            config=str(tmp_path / "two_machines"), extra=["--machine_rank", str(rank)])
                for rank in (0, 1)]
        [run.result() for run in runs]
    assert runtime(out)["num_processes"] == 2
    for a, b in zip(metrics(ddp_run)[0], metrics(out)[0]):
        assert b["loss"] == pytest.approx(a["loss"], rel=LOSS_RTOL)


@pytest.mark.distributed
def test_a_world_per_machine_from_deepspeeds_own_launcher_is_refused_before_any_work(text_data, tmp_path):
    """The trap of a naive multi-node script: `accelerate launch --num_machines 2 ...` with a DeepSpeed
    config hands each machine to DeepSpeed's pdsh launcher, which without a hostfile starts a world
    of one process there; each would train alone on half the global batch. Every process compares
    its world with the launch's 2 processes and stops with one line."""
    import subprocess
    import sys

    port, out = free_port(), tmp_path / "run"
    env = {**environment(), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # finds `deepspeed`

    def machine(rank: int) -> subprocess.Popen:
        # cwd: accelerate writes a .deepspeed_env file where it is launched
        return subprocess.Popen(
            [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIGS / "zero3.yaml"),
             "--num_machines", "2", "--machine_rank", str(rank), "--num_processes", "2", "--main_process_ip",
             "127.0.0.1", "--main_process_port", str(port), "-m", "toolkit.train", *tiny_run(text_data, out, **ARGS)],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    machines = [machine(rank) for rank in (0, 1)]
    results = [m.communicate(timeout=300) for m in machines]
    assert all(m.returncode != 0 for m in machines), results
    line = ("error: `accelerate launch` asked for 2 processes in all, but this process joined a world of 1: its "
            "launcher started a world of its own. With a DeepSpeed config on several machines pass "
            "`--deepspeed_multinode_launcher standard`")
    assert any(line in err for _, err in results), results
    assert not out.exists()  # stopped before the output_dir was even created


def test_a_strategy_that_does_not_engage_stops_with_a_clear_error(monkeypatch):
    """Simulate accelerate's silent fallback: an FSDP launch whose processes each run alone."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    fallback = SimpleNamespace(distributed_type=strategy.DistributedType.NO, num_processes=1,
                               device=torch.device("cpu"), mixed_precision="no", native_amp=False)
    with pytest.raises(UserError, match="asked for fsdp on 2 processes but 1 process\\(es\\) joined"):
        strategy.verify(fallback, torch.nn.Linear(2, 2), None, RunConfig())
    fallback.num_processes = 2
    fallback.distributed_type = strategy.DistributedType.MULTI_CPU
    with pytest.raises(UserError, match="accelerate runs MULTI_CPU, not FSDP"):
        strategy.verify(fallback, torch.nn.Linear(2, 2), None, RunConfig())
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    with pytest.raises(UserError, match="without DistributedDataParallel"):
        strategy.verify(fallback, torch.nn.Linear(2, 2), None, RunConfig())


@pytest.mark.distributed
def test_tensor_parallel_is_refused_before_any_work(text_data, tmp_path):
    """A parallelism_config with tp_size 2 (what accelerate's FSDP2 + TP layout asks for) stops every
    rank with the one line, before a process group, a model or output_dir exists."""
    config = yaml.safe_load((ACCELERATE_CONFIGS / "hsdp.yaml").read_text())
    config["num_processes"] = 2
    config["parallelism_config"].update(parallelism_config_dp_replicate_size=1, parallelism_config_dp_shard_size=1,
                                        parallelism_config_tp_size=2)
    (tmp_path / "tp.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    proc = launch("toolkit.train", tiny_run(text_data, out), config=str(tmp_path / "tp"), check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode != 0 and errors == [
        "error: the accelerate config asks for tp_size=2, but this toolkit runs data parallelism only (tensor, "
        "context and sequence parallelism are not supported): set those sizes to 1 in its parallelism_config"], \
        proc.stderr[-3000:]
    assert not out.exists()


def test_model_parallel_sizes_are_read_from_any_launch(monkeypatch):
    """accelerate launch passes a parallelism_config as environment variables; DDP and FSDP alike."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("ACCELERATE_USE_PARALLELISM_CONFIG", "true")
    for dim, size in (("DP_REPLICATE", 2), ("DP_SHARD", 2), ("CP", 1)):
        monkeypatch.setenv(f"PARALLELISM_CONFIG_{dim}_SIZE", str(size))
    strategy.Requested.from_env().refuse_model_parallelism()  # HSDP runs
    monkeypatch.setenv("PARALLELISM_CONFIG_CP_SIZE", "2")
    for kind in ("ACCELERATE_USE_FSDP", None):
        if kind:
            monkeypatch.setenv(kind, "true")
        else:
            monkeypatch.delenv("ACCELERATE_USE_FSDP")
        with pytest.raises(UserError, match="^the accelerate config asks for cp_size=2, but"):
            strategy.Requested.from_env().refuse_model_parallelism()


def test_deepspeed_json_that_contradicts_the_run_config_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"gradient_accumulation_steps": 8, "zero_optimization": {"stage": 2}}))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(path))
    plugin = SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": 2}})
    with pytest.raises(UserError, match='sets gradient_accumulation_steps=8 but the run config implies 1'):
        strategy.zero.fill_config(plugin, RunConfig(), num_processes=2)
    path.write_text(json.dumps({"gradient_accumulation_steps": "auto", "zero_optimization": {"stage": 3}}))
    strategy.zero.fill_config(plugin, RunConfig(), num_processes=2)
    assert plugin.deepspeed_config["train_batch_size"] == 16 and plugin.deepspeed_config["gradient_clipping"] == 1.0


def test_the_fp16_loss_scale_floor_comes_from_the_run_config(tmp_path, monkeypatch):
    """The shipped JSONs say "min_loss_scale": "auto"; a number there that contradicts
    train.min_loss_scale is refused, as the batch keys are."""
    path = tmp_path / "ds.json"
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(path))
    cfg = RunConfig()
    cfg.train.min_loss_scale = 1024
    for shipped in (ROOT / "ds_configs").glob("*.json"):
        path.write_text(shipped.read_text())
        plugin = SimpleNamespace(deepspeed_config=json.loads(shipped.read_text()))
        strategy.zero.fill_config(plugin, cfg, num_processes=2)
        assert plugin.deepspeed_config["fp16"]["min_loss_scale"] == 1024, shipped.name
    path.write_text(json.dumps({"fp16": {"enabled": "auto", "min_loss_scale": 1}, "zero_optimization": {"stage": 2}}))
    plugin = SimpleNamespace(deepspeed_config={"fp16": {"enabled": "auto", "min_loss_scale": 1},
                                               "zero_optimization": {"stage": 2}})
    with pytest.raises(UserError, match='sets fp16.min_loss_scale=1 but the run config has train.min_loss_scale=1024'):
        strategy.zero.fill_config(plugin, cfg, num_processes=2)


def test_zero3_working_set_auto_is_two_decoder_layers(tmp_path, monkeypatch):
    """"auto" in a ZeRO-3 JSON: gathered parameters are kept and prefetched up to two decoder
    layers of the run's model (DeepSpeed's own default, 1e9, is all of a model below 1B)."""
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    zero = {"stage": 3, "stage3_max_live_parameters": "auto", "stage3_max_reuse_distance": 5}
    plugin = SimpleNamespace(deepspeed_config={"zero_optimization": zero})
    cfg = RunConfig()
    cfg.model.name_or_path = "random-opt-350m"
    strategy.zero.fill_config(plugin, cfg, num_processes=2)
    layer = 4 * 1024**2 + 2 * 1024 * 4096  # q, k, v, out_proj + fc1, fc2 of opt-350m
    assert zero["stage3_max_live_parameters"] == 2 * layer and zero["stage3_max_reuse_distance"] == 5


@pytest.mark.parametrize("model, elements", [("random-opt-350m", 10**8), ("random-opt-2.7b", 50272 * 2560)])
def test_nvme_parameter_buffers_hold_the_largest_parameter(tmp_path, monkeypatch, model, elements):
    """zero3_nvme.json's "buffer_size": "auto": DeepSpeed's 1e8 elements, or the model's largest
    parameter where that is bigger (opt-2.7b's embeddings), which zero.Init refuses to swap otherwise."""
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    ds = json.loads((ROOT / "ds_configs" / "zero3_nvme.json").read_text())
    cfg = RunConfig()
    cfg.model.name_or_path, cfg.output_dir = model, str(tmp_path)
    strategy.zero.fill_config(SimpleNamespace(deepspeed_config=ds), cfg, num_processes=2)
    assert ds["zero_optimization"]["offload_param"]["buffer_size"] == elements


def test_nvme_swap_files_and_a_checkpoint_must_fit_their_disk(tmp_path, monkeypatch):
    """random-opt-2.7b, bf16, one process: 18 bytes per parameter of swap files (47.7 GB) and 12 of
    the optimizer's copy in each checkpoint (31.8 GB), refused before any work where they can't fit
    (this machine's 71 GB free hold the first and not both). Swap files an earlier run left are
    overwritten, so they count as free."""
    import shutil

    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    plugin = SimpleNamespace(deepspeed_config=json.loads((ROOT / "ds_configs" / "zero3_nvme.json").read_text()))
    cfg = RunConfig()
    cfg.model.name_or_path, cfg.output_dir = "random-opt-2.7b", str(tmp_path)
    strategy.zero.fill_config(plugin, cfg, num_processes=1)
    free = {"bytes": 0}
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=free["bytes"]))

    def check(free_gb: float, every: int):
        free["bytes"], cfg.checkpoint.every = free_gb * 1e9, every
        strategy.zero.check_nvme_space(plugin, cfg, "bf16", world_size=1, local_processes=1)

    with pytest.raises(UserError, match=r"needs 47\.7 GB of swap files on this node in .*nvme_offload, which has 40\.0"):
        check(40, every=0)
    with pytest.raises(UserError, match=r"\(47\.7 GB\) and one checkpoint's copy of the optimizer state \(31\.8 GB\) "
                                        r"need 79\.5 GB .* 71\.0 GB free: checkpoints would fail"):
        check(71, every=50)
    check(71, every=0)  # no checkpoints: the swap files alone fit
    check(80, every=50)
    with (tmp_path / "nvme_offload" / "left.swp").open("wb") as f:  # sparse: 10 GB apparent, nothing on disk
        f.truncate(10 * 10**9)
    check(40, every=0)
    with pytest.raises(UserError, match=r"needs 53\.0 GB"):  # fp32 weights: 4 bytes, not 2
        strategy.zero.check_nvme_space(plugin, cfg, "no", world_size=1, local_processes=1)
    # two nodes of one process each: each node's disk holds half
    strategy.zero.check_nvme_space(plugin, cfg, "no", world_size=2, local_processes=1)
