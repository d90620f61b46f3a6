"""Each library internal the toolkit relies on (the table in toolkit/patches.py) is still there and
still behaves as the patch expects: a release inside pyproject's ranges that moves one fails here,
in the fast tier (`make test-latest` runs it against the newest releases), not in a user's run."""

import inspect
from types import SimpleNamespace

import pytest
import torch

from conftest import in_a_process_group_of_one
from toolkit import patches


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_accelerate_turns_on_fsdp_for_a_cpu_state_marked_multi_gpu(monkeypatch, fresh_accelerate_state):
    """run_fsdp_on_cpu: without it an FSDP config on a machine without a GPU runs unsharded."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    PartialState(cpu=True)
    patches.run_fsdp_on_cpu()
    accelerator = Accelerator(cpu=True)
    assert accelerator.distributed_type == DistributedType.FSDP and accelerator.state.fsdp_plugin.fsdp_version == 2


def test_fp16_on_cpu_scales_the_loss_and_the_scaler_skips_an_overflow_on_the_device(fresh_accelerate_state):
    """enable_cpu_fp16 (accelerate: autocast and GradScaler for GPUs only) and step_unless (torch's
    fused AdamW takes GradScaler's found_inf): an infinite gradient skips the step without moving a
    weight and halves the scale, and the next step trains (accelerate's optimizer step must run the
    scaler's step and update, or the next unscale raises)."""
    from accelerate import Accelerator

    from toolkit.guard import StepGuard

    accelerator = Accelerator(mixed_precision="fp16", cpu=True)
    patches.enable_cpu_fp16(accelerator)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    guard = StepGuard(accelerator, optimizer, min_loss_scale=1.0)
    assert accelerator.native_amp and guard.scale == 2.0**16
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # x 1e-3: at the scale of 2^15 the bias's fp16 gradient (2 x 2^15) would overflow by itself
    for gradient_scale, stepped in ((float("inf"), False), (1e-3, True)):
        out = model(torch.ones(2, 4))
        assert out.dtype == torch.float32  # autocast ran, the output upcast
        accelerator.backward(out.sum() * gradient_scale)
        norm = accelerator.clip_grad_norm_(model.parameters(), 1.0)
        assert guard.step(optimizer, out.sum().detach(), norm) is stepped
        optimizer.zero_grad()
        unchanged = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert unchanged is not stepped
    assert guard.scale == 2.0**15 and guard.scale_record() == {"loss_scale": 2.0**15, "overflow": 1}


def test_a_fused_optimizer_skips_a_flagged_step_on_the_device():
    """step_unless without a scaler (bf16/fp32): the flag is a device tensor, never read on the host."""
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    model(torch.ones(2, 4)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    patches.step_unless(optimizer, torch.tensor(True))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not hasattr(optimizer, "found_inf")
    patches.step_unless(optimizer, torch.tensor(False))
    assert not any(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(s["step"].item() == 1 for s in optimizer.state.values())  # the skipped step was not counted


def test_zero3_updates_its_fp32_partitions_in_place():
    """share_zero3_fp32_partitions: DeepSpeed's stage 3 compares a torch.device with a string and
    keeps a second fp32 copy of every partition; patched, its masters are the partitions."""
    out = in_a_process_group_of_one("""
        from toolkit import patches
        from toolkit.strategy import zero
        config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
        for patched in (False, True):
            if patched:
                patches.share_zero3_fp32_partitions()
            engine, *_ = deepspeed.initialize(model=torch.nn.Sequential(torch.nn.Linear(64, 64)), config=config)
            print("masters are the parameters:", patched, zero.masters_are_parameters(engine.optimizer))
    """)
    assert "masters are the parameters: False False" in out  # the bug the patch is for is still there
    assert "masters are the parameters: True True" in out


def test_deepspeed_counts_an_overflow_at_its_floor_without_raising(monkeypatch):
    from deepspeed.runtime.fp16 import loss_scaler

    monkeypatch.setattr(loss_scaler.dist, "get_rank", lambda: 0)  # it names the rank in its overflow message
    scaler = loss_scaler.DynamicLossScaler(init_scale=4.0, scale_window=1000, min_scale=4.0, delayed_shift=1,
                                           consecutive_hysteresis=False)
    assert patches.count_overflows_at_the_floor(SimpleNamespace(loss_scaler=scaler)) == 4.0
    scaler.update_scale(True)  # raised "Current loss scale already at minimum" unpatched
    assert scaler.cur_scale == 4.0


def test_accelerate_fsdp2_and_deepspeed_helpers_keep_their_shape():
    """Internals used as they are: accelerate's FSDP2 helpers and plugin fields (strategy/fsdp.py),
    DeepSpeedPlugin.set_deepspeed_weakref (strategy/__init__.py)."""
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_apply_ac, fsdp2_prepare_model

    for helper in (fsdp2_prepare_model, fsdp2_apply_ac):
        assert list(inspect.signature(helper).parameters) == ["accelerator", "model"], helper
    fields = FullyShardedDataParallelPlugin.__dataclass_fields__
    assert {"cpu_ram_efficient_loading", "activation_checkpointing", "mixed_precision_policy", "cpu_offload",
            "fsdp_version"} <= fields.keys()
    assert callable(FullyShardedDataParallelPlugin.set_auto_wrap_policy)
    assert callable(DeepSpeedPlugin.set_deepspeed_weakref)


def test_the_byte_counter_sits_in_front_of_every_collective():
    """comm.py registers a kernel at the Autograd key of torch.ops.c10d's collectives: one all-reduce
    in a group of one passes through it (counted as if two ranks sent it)."""
    out = in_a_process_group_of_one("""
        from toolkit import comm
        comm.bytes_sent = lambda kind, input_bytes, ranks: input_bytes
        with comm.CommMeter() as meter:
            torch.distributed.all_reduce(torch.ones(256))
        print("all_reduce bytes:", meter.take()["all_reduce"])
    """)
    assert "all_reduce bytes: 1024" in out


def test_the_launch_request_is_read_with_accelerates_own_parser(tmp_path):
    """launched_processes: the `accelerate launch` above a process, parsed by accelerate's
    launch_command_parser: its --num_processes, else its config file's; none without such a command."""
    import subprocess
    import sys

    child = "from toolkit.launch import launched_processes; print(launched_processes())"
    accelerate = tmp_path / "accelerate"  # stands in for the console script: runs the "worker"
    accelerate.write_text(f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {child!r}], check=True)\n")
    (tmp_path / "cfg.yaml").write_text("distributed_type: MULTI_GPU\nnum_machines: 2\nnum_processes: 4\n")

    def launched(*args: str) -> str:
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, check=True).stdout.strip()
    script_args = ["-m", "toolkit.train", "--num_processes", "5"]  # the script's own, not accelerate's
    assert launched(str(accelerate), "launch", "--num-processes=3", *script_args) == "3"
    assert launched(str(accelerate), "launch", "--config_file", str(tmp_path / "cfg.yaml"), *script_args) == "4"
    assert launched("-c", child) == "None"
