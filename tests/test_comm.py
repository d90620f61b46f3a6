"""Bytes sent through collectives (toolkit/comm.py) against what each strategy must send per
optimizer step, and DDP's communication hooks (run config section `ddp`).

Every launched run is tiny-opt in fp32 on 2 processes over gloo, 4 steps, started the first time a
test asks for it and shared by the tests of this module. comm.py's convention: a rank's share of
the traffic under ring algorithms, from the collectives' tensor sizes; with N ranks and the model's
P parameters of 4 bytes, one pass of every parameter through an all-gather or a reduce-scatter is
H = (N-1)/N x 4P bytes, an all-reduce 2H.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from conftest import ACCELERATE_CONFIGS, ROOT, launch, metrics, tiny_run
from toolkit import comm, strategy
from toolkit.config import RunConfig, UserError, load

sys.path.insert(0, str(ROOT / "benchmarks"))
from scaling import COLLECTIVE, step_split  # noqa: E402  (how the scaling benchmark reads a trace)

N = 2
# Steps 3-4 also recorded by torch.profiler (test_profiled_steps_hold_the_strategys_collectives).
ARGS = {"train.max_steps": 4, "eval.max_batches": 1, "train.profile_steps": 2}
KINDS = [f"comm_bytes_{kind}" for kind in comm.KINDS]
# Besides the strategy's bulk, a few bytes per step or once: DeepSpeed all-reduces 2 scalars for
# the gradient norm and overflow check (8 B), DDP broadcasts its bucket order once when it rebuilds
# the buckets after step 1 (78 B), ZeRO-3 broadcasts 828 B at step 2. The formulas are met
# exactly from below, so a bucket or parameter missed fails at once; up to SMALL above is allowed.
SMALL = 1024


@pytest.fixture(scope="module")
def runs(text_data, tmp_path_factory):
    """run(name, config, **overrides) -> output_dir: launched once per name."""
    done = {}

    def run(name: str, config: str | None = None, **overrides) -> Path:
        if name not in done:
            out = tmp_path_factory.mktemp(name)
            launch("toolkit.train", tiny_run(text_data, out, **{**ARGS, **overrides}), config=config or name,
                   extra=["--mixed_precision", "no"])
            done[name] = out
        return done[name]

    return run


@pytest.fixture(scope="module")
def deepspeed_variant(tmp_path_factory):
    """variant(config, **zero_optimization) -> an accelerate config (path without .yaml) like
    accelerate_configs/<config>.yaml, whose DeepSpeed JSON sets these ZeRO keys too."""
    folder = tmp_path_factory.mktemp("ds_variants")

    def variant(config: str, **zero) -> str:
        acc = yaml.safe_load((ACCELERATE_CONFIGS / f"{config}.yaml").read_text())
        ds = json.loads((ROOT / acc["deepspeed_config"]["deepspeed_config_file"]).read_text())
        ds["zero_optimization"].update(zero)
        name = f"{config}_" + "_".join(f"{k}{v}" for k, v in zero.items())
        (folder / f"{name}.json").write_text(json.dumps(ds))
        acc["deepspeed_config"]["deepspeed_config_file"] = str(folder / f"{name}.json")
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(acc))
        return str(folder / name)

    return variant


def sizes(out: Path) -> dict:
    """Parameter elements of the trained model, from its export (the tied lm_head stored once)."""
    weights = load_file(out / "final" / "model.safetensors")
    return {"all": sum(w.numel() for w in weights.values()),
            "layers": sum(w.numel() for k, w in weights.items() if ".layers." in k),  # FSDP's wrapped units
            "embed_tokens": weights["model.decoder.embed_tokens.weight"].numel(),
            # parameters ZeRO-3 keeps whole on every rank (stage3_param_persistence_threshold "auto":
            # accelerate sets 10 x hidden): gathered once after each step, not at each use
            "persistent": sum(w.numel() for w in weights.values() if w.numel() < 10 * 128)}


def pass_bytes(elements: int) -> int:
    """H: elements passed once through an all-gather or reduce-scatter, in bytes per rank (fp32)."""
    return (N - 1) * 4 * elements // N


def steady(name: str, p: dict) -> dict:
    """Bytes per optimizer step by kind, as each strategy's real config runs tiny-opt."""
    h = pass_bytes(p["all"])
    return {
        # every gradient all-reduced once: 2H (the ZeRO paper's 2 Psi, times (N-1)/N)
        "ddp": {"all_reduce": 2 * h},
        # DeepSpeed 0.19 all-reduces whole gradient buckets (use_multi_rank_bucket_allreduce, on by
        # default) although each rank keeps only its partition, then all-gathers the updated
        # partitions: 3H, not the paper's 2H (test_zero2_reducing_to_owners_sends_the_paper_volume)
        "zero1": {"all_reduce": 2 * h, "all_gather": h},
        "zero2": {"all_reduce": 2 * h, "all_gather": h},
        # between gathering each parameter once per step (kept from forward for backward) and at
        # every use, as stage3_max_reuse_distance / max_live_parameters decide: both ends are
        # pinned by test_zero3_gathers_once_or_at_every_use_as_configured
        "zero3": {"all_gather": (h, pass_bytes(every_use(p))), "reduce_scatter": h},
        # the decoder layers are gathered in forward and again in backward; the root module's own
        # parameters (embeddings, final layer norm) are not resharded after forward: gathered once
        "fsdp": {"all_gather": h + pass_bytes(p["layers"]), "reduce_scatter": h},
    }[name]


def every_use(p: dict) -> int:
    """Elements ZeRO-3 gathers per step when it keeps nothing: every parameter in forward and again
    in backward, the tied embedding twice in each (input embedding, LM head), except the small
    persistent parameters, gathered once after the step."""
    return 2 * (p["all"] + p["embed_tokens"]) - p["persistent"]


def assert_bytes(record: dict, want: dict, where) -> None:
    """Each kind within [formula, formula + SMALL] (or a range of formulas); kinds the strategy does
    not use below SMALL."""
    for key in KINDS:
        expected = want.get(key.removeprefix("comm_bytes_"), 0)
        low, high = expected if isinstance(expected, tuple) else (expected, expected)
        assert low <= record[key] <= high + SMALL, (where, key, record[key], low, high)
    assert record["comm_bytes"] == sum(record[key] for key in KINDS), where


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["ddp", "zero1", "zero2", "zero3", "fsdp"])
def test_bytes_per_step_follow_the_strategy(name, runs):
    out = runs(name)
    train = metrics(out)[0]
    p = sizes(out)
    assert p["all"] == yaml.safe_load((out / "config.yaml").read_text())["runtime"]["params_numel"]
    # ZeRO-3's first step gathers more: DeepSpeed records the order of use and releases as it goes
    first = 2 if name == "zero3" else 1
    for record in train[first - 1:]:
        assert_bytes(record, steady(name, p), (name, record["step"]))
    # summary.json: this session's totals (every step was logged)
    summary = json.loads((out / "summary.json").read_text())
    for key in ["comm_bytes", *KINDS]:
        assert summary[key] == sum(r[key] for r in train), key


@pytest.mark.distributed
def test_zero2_reducing_to_owners_sends_the_paper_volume(runs, deepspeed_variant):
    """With use_multi_rank_bucket_allreduce off, ZeRO-2 reduces each gradient slice to the rank that
    owns it (H) and all-gathers the updated partitions (H): the paper's 2 Psi."""
    out = runs("zero2_reduce", deepspeed_variant("zero2", use_multi_rank_bucket_allreduce=False))
    h = pass_bytes(sizes(out)["all"])
    for record in metrics(out)[0]:
        assert_bytes(record, {"reduce": h, "all_gather": h}, record["step"])


@pytest.mark.distributed
@pytest.mark.parametrize("keep", [10**9, 0])
def test_zero3_gathers_once_or_at_every_use_as_configured(keep, runs, deepspeed_variant):
    """ZeRO-3 keeps a gathered parameter for its next use within stage3_max_reuse_distance
    elements, and up to stage3_max_live_parameters: with both above the model (1e9), each
    parameter is gathered once per step, forward only (with the reduce-scatter 2H, not the paper's
    3H); with both 0 and no prefetch (what a model much larger than them sees), at every use
    (every_use: the paper's 3H plus the embedding's second use)."""
    out = runs(f"zero3_keep{keep}", deepspeed_variant("zero3", stage3_max_reuse_distance=keep,
                                                     stage3_max_live_parameters=keep, stage3_prefetch_bucket_size=keep))
    p = sizes(out)
    gathered = p["all"] if keep else every_use(p)
    for record in metrics(out)[0][1:]:  # step 1: DeepSpeed records the order of use, releasing as it goes
        assert_bytes(record, {"all_gather": pass_bytes(gathered), "reduce_scatter": pass_bytes(p["all"])},
                     record["step"])


@pytest.mark.distributed
def test_accumulation_does_not_add_ddp_communication(runs):
    """DDP all-reduces only on the last micro-batch of a step: twice the micro-batches per step,
    the same bytes per step (a sync on every micro-batch would double them)."""
    one = metrics(runs("ddp"))[0]
    two = metrics(runs("ddp_accum2", "ddp", **{"train.micro_batch_size": 2, "train.grad_accum_steps": 2}))[0]
    assert [r["comm_bytes"] for r in two] == [r["comm_bytes"] for r in one]


@pytest.mark.distributed
@pytest.mark.parametrize("name, collectives", [
    ("ddp", {"gloo:all_reduce"}),
    ("zero3", {"gloo:all_gather", "gloo:all_reduce"}),  # gloo runs the reduce-scatter as an all-reduce
])
def test_profiled_steps_hold_the_strategys_collectives(name, collectives, runs):
    """train.profile_steps=2: each rank's trace records steps 3 and 4 (torch names them from 0), with
    the collectives the strategy's bytes go through; their time is part of each step, not all of it.
    What benchmarks/scaling.py splits into compute and communication."""
    for rank in range(N):
        trace = runs(name) / "profile" / f"rank{rank}.json"
        names = [e["name"] for e in json.loads(trace.read_text())["traceEvents"] if e.get("ph") == "X"]
        assert sorted(n for n in names if n.startswith("ProfilerStep#")) == ["ProfilerStep#2", "ProfilerStep#3"]
        # (besides the loop's own small reductions: token count, logged loss, throughput's all-gather)
        assert {n for n in names if COLLECTIVE.search(n)} >= collectives, rank
        for step in step_split(trace):
            assert 0 < step["comm_s"] < step["step_s"], (rank, step)


# --- DDP communication hooks ---------------------------------------------------------------------


@pytest.mark.distributed
def test_bf16_hook_halves_ddp_bytes_and_keeps_the_losses(runs):
    """bf16 rounds each averaged gradient to 8 significant bits: relative error 2^-9 per element,
    twice (before and after the sum), so each step's update differs by under 0.4% relative (Adam
    normalises the gradient's scale away). Over the 0.31 the loss falls in these 4 steps that
    moves the loss by under 0.004 x 0.31 / 7.3 = 1.7e-4 relative: bounded by 2e-4 (measured
    1e-5 at step 4). The gradient norm, from elements each within 0.4%, is within 0.4% (measured
    1.5e-4); a gradient not averaged over ranks would double it."""
    fp32, bf16 = metrics(runs("ddp"))[0], metrics(runs("ddp_bf16", "ddp", **{"ddp.comm_hook": "bf16"}))[0]
    for a, b in zip(fp32, bf16, strict=True):
        assert b["comm_bytes_all_reduce"] / a["comm_bytes_all_reduce"] == pytest.approx(0.5, rel=1e-3)
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-4), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=4e-3), a["step"]


def powersgd_elements(weights: dict, rank: int) -> int:
    """Elements PowerSGD all-reduces per step: a matrix (its rows x the rest) as P and Q, rank
    columns each, when that is under half its size (torch's min_compression_rate 2); the others whole."""
    total = 0
    for w in weights.values():
        n = w.shape[0]
        m = w.numel() // n
        r = min(n, m, rank)
        total += (n + m) * r if (n + m) * r * 2 < n * m else w.numel()
    return total


@pytest.mark.distributed
def test_powersgd_sends_a_low_rank_gradient_and_still_trains(runs):
    """Steps 1-2 run uncompressed (powersgd_start_step=2), then rank-1 PowerSGD sends 1.5% of the
    bytes. Its update is an approximation (with error feedback): the loss must still fall on the
    compressed step and stay within 1% relative of the exact run's (measured 0.1%); a hook that
    dropped or mis-scaled gradients moves it by several percent or stops the descent."""
    overrides = {"ddp.comm_hook": "powersgd", "ddp.powersgd_rank": 1, "ddp.powersgd_start_step": 2}
    exact, out = metrics(runs("ddp"))[0], runs("ddp_powersgd", "ddp", **overrides)
    compressed = metrics(out)[0]
    low_rank = 2 * pass_bytes(powersgd_elements(load_file(out / "final" / "model.safetensors"), rank=1))
    for a, b in zip(exact, compressed, strict=True):
        if b["step"] <= 2:
            assert b["comm_bytes"] == a["comm_bytes"]
        else:
            assert b["comm_bytes_all_reduce"] == low_rank < 0.05 * a["comm_bytes_all_reduce"]
    assert compressed[2]["loss"] == pytest.approx(exact[2]["loss"], rel=1e-6)  # updates so far exact
    assert math.isfinite(compressed[3]["loss"]) and compressed[3]["loss"] < compressed[2]["loss"]
    assert compressed[3]["loss"] == pytest.approx(exact[3]["loss"], rel=1e-2)


# --- units: the convention, and ddp.* keys where DDP does not run ----------------------------------


def test_bytes_sent_convention():
    mib = 2**20
    assert comm.bytes_sent("all_reduce", mib, 4) == 2 * 3 * mib // 4
    assert comm.bytes_sent("reduce_scatter", mib, 4) == 3 * mib // 4  # input: the whole tensor
    assert comm.bytes_sent("all_gather", mib, 4) == 3 * mib  # input: this rank's shard
    assert comm.bytes_sent("broadcast", mib, 2) == comm.bytes_sent("reduce", mib, 2) == mib // 2
    assert comm.bytes_sent("all_reduce", mib, 1) == 0


@pytest.mark.parametrize("kind, running", [("fsdp", "FSDP"), ("deepspeed", "DeepSpeed"),
                                           ("single", "a single process")])
def test_ddp_keys_are_refused_where_ddp_does_not_run(kind, running):
    cfg = load(None, ["data.train=x.txt", "ddp.comm_hook=bf16"])
    with pytest.raises(UserError, match=f"^ddp.comm_hook applies to DDP only; this launch runs {running}: "
                                        "remove it or use accelerate_configs/ddp.yaml$"):
        strategy.ddp.ddp_kwargs(cfg, kind)
    cfg = load(None, ["data.train=x.txt", "ddp.static_graph=true"])
    with pytest.raises(UserError, match="^ddp.static_graph applies"):
        strategy.ddp.ddp_kwargs(cfg, kind)
    strategy.ddp.ddp_kwargs(load(None, ["data.train=x.txt"]), kind)  # defaults are fine everywhere


def test_ddp_kwargs_carry_the_run_config():
    cfg = load(None, ["data.train=x.txt", "ddp.bucket_cap_mb=5", "ddp.static_graph=true"])
    kwargs = strategy.ddp.ddp_kwargs(cfg, "ddp").to_kwargs()
    assert kwargs == {"bucket_cap_mb": 5, "static_graph": True, "gradient_as_bucket_view": True}
    assert strategy.ddp.ddp_kwargs(RunConfig(), "ddp").to_kwargs() == {"gradient_as_bucket_view": True}


@pytest.mark.parametrize("override, message", [
    ("ddp.comm_hook=int8", "ddp.comm_hook must be one of none, bf16, fp16, powersgd"),
    ("ddp.powersgd_start_step=1", "ddp.powersgd_start_step must be >= 2"),
    ("ddp.powersgd_rank=0", "ddp.powersgd_rank must be > 0"),
])
def test_bad_ddp_keys(override, message):
    with pytest.raises(UserError, match=message):
        load(None, ["data.train=x.txt", override])
