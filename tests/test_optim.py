"""Optimizers: parameter groups, schedules, 8-bit state size, and which optimizer runs under which
strategy (refused combinations stop before any work, with what to use instead)."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
import yaml

from conftest import ACCELERATE_CONFIGS, ROOT, fake_accelerator, launch, metrics, runtime, tiny_opt, tiny_run
from toolkit import measure, strategy
from toolkit.config import OptimConfig, RunConfig, UserError
from toolkit.optim import build_optimizer, build_scheduler, param_groups

def ds_optimizer() -> dict:
    """A fresh section each time: check_optimizer fills "auto" values in place."""
    return {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}}


def test_8bit_state_is_about_a_quarter_of_adamw():
    """tiny-opt's matrices (16k-262k elements) are above bitsandbytes' 4096-element 8-bit threshold."""
    sizes = {}
    for name in ("adamw", "adamw_8bit", "paged_adamw_8bit"):
        model = tiny_opt()
        optimizer = build_optimizer(model, OptimConfig(name=name))
        ids = torch.randint(0, 2048, (2, 16), generator=torch.Generator().manual_seed(0))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        sizes[name] = measure.optimizer_state_size(optimizer)[1]
    assert sizes["adamw"] == 2 * 4 * sum(p.numel() for p in model.parameters())  # exp_avg + exp_avg_sq, fp32
    assert sizes["adamw_8bit"] <= 0.3 * sizes["adamw"]
    assert sizes["paged_adamw_8bit"] == sizes["adamw_8bit"]  # paging is CUDA-only; the states are the same


def test_param_groups_exclude_frozen_and_skip_decay_on_biases_and_layer_norms():
    model = tiny_opt()
    model.model.decoder.embed_positions.weight.requires_grad_(False)
    decay, no_decay = param_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert "model.decoder.embed_positions.weight" not in decayed | not_decayed
    assert decayed == {n for n, p in model.named_parameters()
                       if p.requires_grad and p.ndim == 2 and "layer_norm" not in n}
    assert "model.decoder.layers.0.fc1.bias" in not_decayed
    assert "model.decoder.layers.0.self_attn_layer_norm.weight" in not_decayed
    assert len(decayed) + len(not_decayed) == sum(p.requires_grad for p in model.parameters())


COSINE = [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
SCHEDULES = {"linear": [0.0, 0.5, 1.0, 0.75, 0.5, 0.25], "cosine": [0.0, 0.5, *COSINE],
             "constant": [0.0, 0.5, 1.0, 1.0, 1.0, 1.0]}


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedules_with_warmup(name):
    """Same LR sequence from the torch path and from the recipe a DeepSpeed-owned optimizer gets."""
    cfg = OptimConfig(lr=1.0, scheduler=name, warmup_steps=2)
    param = torch.nn.Parameter(torch.zeros(1))
    deepspeed_cfg = OptimConfig(lr=1.0, scheduler=name, warmup_steps=2, name="deepspeed")
    recipe = build_scheduler(build_optimizer(torch.nn.Linear(1, 1), deepspeed_cfg), deepspeed_cfg, max_steps=6)
    for scheduler in (build_scheduler(torch.optim.SGD([param], lr=1.0), cfg, max_steps=6),
                      recipe.lr_scheduler_callable(torch.optim.SGD([param], lr=1.0))):
        lrs = []
        for _ in range(6):
            lrs.append(scheduler.get_last_lr()[0])
            scheduler.optimizer.step()
            scheduler.step()
        assert lrs == pytest.approx(SCHEDULES[name], abs=1e-12)


def accelerator_for(config: str, tmp_path=None, ds_json: dict | None = None, monkeypatch=None):
    """What `make_accelerator` returns for an accelerate config file, enough for check_optimizer."""
    acc = yaml.safe_load((ACCELERATE_CONFIGS / f"{config}.yaml").read_text())
    kind = {"DEEPSPEED": strategy.DistributedType.DEEPSPEED, "FSDP": strategy.DistributedType.FSDP}.get(
        acc["distributed_type"], strategy.DistributedType.MULTI_CPU)
    plugin = None
    if kind == strategy.DistributedType.DEEPSPEED:
        path = ROOT / acc["deepspeed_config"]["deepspeed_config_file"]
        written = json.loads(path.read_text())
        if ds_json is not None:
            written.update(ds_json)
            path = tmp_path / "ds.json"
            path.write_text(json.dumps(written))
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(path))
        plugin = SimpleNamespace(deepspeed_config=written)
    return fake_accelerator(distributed_type=kind, state=SimpleNamespace(deepspeed_plugin=plugin))


def check(name: str, accelerator, **optim):
    cfg = RunConfig()
    cfg.optim = OptimConfig(name=name, **optim)
    strategy.check_optimizer(accelerator, cfg)
    return accelerator


CONFIGS = sorted(p.stem for p in ACCELERATE_CONFIGS.glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("name", ["adamw_8bit", "paged_adamw_8bit"])
def test_8bit_is_refused_under_fsdp_and_optimizer_offload(name, config, tmp_path, monkeypatch):
    accelerator = accelerator_for(config, tmp_path, monkeypatch=monkeypatch)
    plugin = accelerator.state.deepspeed_plugin
    offload = plugin and plugin.deepspeed_config["zero_optimization"].get("offload_optimizer", {}).get("device")
    if accelerator.distributed_type == strategy.DistributedType.FSDP:
        with pytest.raises(UserError, match=f"optim.name={name} cannot update FSDP2's sharded parameters .*"
                                            "use optim.name=adamw with FSDP"):
            check(name, accelerator)
    elif offload in ("cpu", "nvme"):
        with pytest.raises(UserError, match=f"optim.name={name} cannot run with DeepSpeed optimizer offload "
                                            f"\\({offload}\\).*use optim.name=adamw with this config"):
            check(name, accelerator)
    else:
        check(name, accelerator)  # ddp, single, ZeRO-1/2/3 without optimizer offload


def test_deepspeed_owned_optimizer_combinations(tmp_path, monkeypatch):
    for config in ("ddp", "fsdp"):
        with pytest.raises(UserError, match="optim.name=deepspeed .* not DeepSpeed: launch with a DeepSpeed"):
            check("deepspeed", accelerator_for(config))
    with pytest.raises(UserError, match='optim.name=deepspeed needs an "optimizer" section in .*zero2.json'):
        check("deepspeed", accelerator_for("zero2", tmp_path, monkeypatch=monkeypatch))
    with_optimizer = accelerator_for("zero2", tmp_path, {"optimizer": ds_optimizer()}, monkeypatch)
    for name in ("adamw", "adamw_8bit"):
        with pytest.raises(UserError, match=f'ds.json has its own "optimizer" section.*optim.name={name}: set '
                                            "optim.name=deepspeed"):
            check(name, with_optimizer)
    with pytest.raises(UserError, match='has its own "scheduler" section.*optim.name=adamw'):
        check("adamw", accelerator_for("zero2", tmp_path, {"scheduler": {"type": "WarmupLR"}}, monkeypatch))
    # "auto" optimizer parameters take the run config's; a value that disagrees is refused
    params = check("deepspeed", with_optimizer, lr=0.01, beta2=0.95, eps=1e-6,
                   weight_decay=0.1).state.deepspeed_plugin.deepspeed_config["optimizer"]["params"]
    assert params == {"lr": 0.01, "betas": [0.9, 0.95], "eps": 1e-6, "weight_decay": 0.1}
    explicit = accelerator_for("zero2", tmp_path, {"optimizer": {"type": "AdamW", "params": {"lr": 0.02}}},
                                monkeypatch)
    with pytest.raises(UserError, match='sets optimizer.params.lr=0.02 but the run config has optim.lr=0.01: set '
                                        '"lr": "auto"'):
        check("deepspeed", explicit, lr=0.01)


# --- real launches: 2 processes on gloo -----------------------------------------------------------

EIGHT_BIT_RTOL = 1e-4
ARGS = {"train.max_steps": 3, "optim.scheduler": "linear", "optim.warmup_steps": 1, "optim.weight_decay": 0.01,
        "eval.max_batches": 1}


@pytest.fixture(scope="module")
def zero2_adamw(text_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("zero2_adamw")
    launch("toolkit.train", tiny_run(text_data, out, **ARGS), config="zero2", extra=["--mixed_precision", "no"])
    return out


@pytest.mark.distributed
def test_8bit_adamw_under_zero2_keeps_8bit_state(zero2_adamw, text_data, tmp_path):
    out = tmp_path / "run"
    launch("toolkit.train", tiny_run(text_data, out, **ARGS, **{"optim.name": "adamw_8bit"}), config="zero2",
           extra=["--mixed_precision", "no"])
    info, reference = runtime(out), runtime(zero2_adamw)
    assert info["num_processes"] == 2 and info["zero_stage"] == 2
    assert (info["optimizer"], reference["optimizer"]) == ("AdamW8bit", "AdamW")
    ours, adamw = metrics(out)[0][-1], metrics(zero2_adamw)[0][-1]
    assert ours["optim_state_numel"] == pytest.approx(adamw["optim_state_numel"], rel=0.01)  # same elements...
    assert ours["optim_state_mb"] <= 0.3 * adamw["optim_state_mb"]  # ...in a quarter of the bytes
    # The same updates up to the quantisation of Adam's moments (256-element blocks, dynamic 8-bit
    # codes). Step 1 has lr 0 (warmup), so step 3's loss follows one real update: measured 2.8e-6
    # relative from 32-bit AdamW, while one update at lr 1e-3 moves this model's loss by ~1e-3
    # relative (a wrong or skipped 8-bit update would show up 10x above EIGHT_BIT_RTOL).
    for a, b in zip(metrics(zero2_adamw)[0], metrics(out)[0]):
        assert b["loss"] == pytest.approx(a["loss"], rel=EIGHT_BIT_RTOL), a["step"]
    assert metrics(out)[0][-1]["loss"] != metrics(zero2_adamw)[0][-1]["loss"]  # 8-bit states really ran


@pytest.mark.distributed
def test_deepspeed_owned_optimizer_trains_like_torch_adamw(zero2_adamw, text_data, tmp_path):
    """The JSON's AdamW, built by DeepSpeed, with the run config's lr, decay and LR schedule."""
    ds = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    (tmp_path / "ds.json").write_text(json.dumps({**ds, "optimizer": ds_optimizer()}))
    acc = yaml.safe_load((ACCELERATE_CONFIGS / "zero2.yaml").read_text())
    acc["deepspeed_config"]["deepspeed_config_file"] = str(tmp_path / "ds.json")
    (tmp_path / "acc.yaml").write_text(yaml.safe_dump(acc))
    out = tmp_path / "run"
    launch("toolkit.train", tiny_run(text_data, out, **ARGS, **{"optim.name": "deepspeed"}),
           config=str(tmp_path / "acc"), extra=["--mixed_precision", "no"])
    assert runtime(out)["optimizer"] == "FusedAdam" and runtime(out)["zero_stage"] == 2  # built by DeepSpeed
    ours, reference = metrics(out)[0], metrics(zero2_adamw)[0]
    assert [r["lr"] for r in ours] == pytest.approx([r["lr"] for r in reference]) == [0.0, 1e-3, 5e-4]
    for a, b in zip(reference, ours):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), a["step"]

    # the same JSON with the run's own optimizer: one clear line, before any work
    failed = tmp_path / "refused"
    proc = launch("toolkit.train", tiny_run(text_data, failed), config=str(tmp_path / "acc"),
                  extra=["--mixed_precision", "no"], check=False)
    assert proc.returncode != 0
    assert f'error: {tmp_path / "ds.json"} has its own "optimizer" section' in proc.stderr
    assert "You cannot specify an optimizer" not in proc.stderr  # accelerate's own error is never reached
    assert not (failed / "config.yaml").exists() and not (failed / "tokenizer").exists()
