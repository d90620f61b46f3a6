"""Check a launch before a long job, one line per check (`ok`, `warn` or `FAIL`):

    accelerate launch --config_file accelerate_configs/zero3.yaml -m toolkit.doctor [--output-dir runs] [--timeout 60]

Libraries, devices, free disk, DeepSpeed ops still to be JIT-built (and stale build locks),
libaio; then that every process joins, all_reduce/all_gather bandwidth, and that the config's
strategy really engages on a tiny OPT model (`strategy.verify`, as training checks it).
Exit status 0 when everything passes, else 2 with one `error: ...` line.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from .config import RunConfig, UserError, run_cli
from .launch import Requested

# torch and the toolkit modules that load it are imported in the checks that use them: --help
# answers at once.

LOW_DISK_GIB = 10


class Report:
    """Every rank runs every check; rank 0 prints all lines, the first process of each other machine
    its FAIL lines (a full disk on machine 2 must show too)."""

    def __init__(self):
        self.rank, self.local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        self.failures: list[str] = []

    def line(self, status: str, check: str, detail: str) -> None:
        if status == "FAIL":
            self.failures.append(detail)
        if self.rank == 0 or (status == "FAIL" and self.local_rank == 0):
            print(f"{'' if self.rank == 0 else f'[rank {self.rank}] '}{status:<4} {check:<13} {detail}", flush=True)

    def stop_if_failed(self) -> None:
        if self.failures:
            more = len(self.failures) - 1
            raise UserError(self.failures[0] + (f" (and {more} more FAIL above)" if more else ""))


def check_versions(report: Report) -> None:
    from .measure import versions

    found = versions()
    missing = [n for n in ("deepspeed", "peft", "bitsandbytes") if n not in found]
    report.line("warn" if missing else "ok", "versions", ", ".join(f"{k} {v}" for k, v in found.items())
                + (f"; not installed: {', '.join(missing)}" if missing else ""))


def check_devices(report: Report) -> None:
    import torch

    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return report.line("ok", "devices", f"{len(names)} CUDA: {', '.join(names)}")
    cores, threads = len(os.sched_getaffinity(0)), torch.get_num_threads()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    # more threads than cores makes the processes of this machine slow each other down
    report.line("warn" if threads * local > cores else "ok", "devices",
                f"no GPU: {cores} CPU cores, {threads} threads per process x {local} processes here")


def check_output_dir(report: Report, output_dir: str) -> None:
    path = Path(output_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        return report.line("FAIL", "output dir", f"{path} is not writable ({e.strerror}): choose another --output-dir")
    free = shutil.disk_usage(path).free / 2**30
    low = free < LOW_DISK_GIB
    report.line("warn" if low else "ok", "output dir",
                f"{path.resolve()}: {free:.1f} GiB free" + (" (checkpoints may not fit)" if low else ""))


def extensions_dir() -> Path:
    """Where torch JIT-builds ops (as torch.utils.cpp_extension._get_build_directory, which creates it)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR") is not None:
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    device = (f"rocm{torch.version.hip.replace('.', '')}" if torch.version.hip else
              f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu")
    return Path(get_default_build_root()) / f"py{sys.version_info.major}{sys.version_info.minor}{sys.abiflags}_{device}"


def check_deepspeed_ops(report: Report, offload: tuple[str, str] | None, lock_wait: float) -> None:
    """Ops DeepSpeed JIT-builds on first use: its comm op as the process group starts, cpu_adam for
    optimizer offload, async_io for NVMe. torch guards a build with a `lock` file and waits without
    limit for it to go: one left by a killed build hangs every run."""
    if offload is None:
        return report.line("ok", "deepspeed ops", "none needed (not a DeepSpeed config)")
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import is_ninja_available
    kinds = ["ShareMemCommBuilder"] + ["CPUAdamBuilder"] * (offload[0] != "none") \
        + ["AsyncIOBuilder"] * ("nvme" in offload)
    builders = [b for b in map(get_accelerator().create_op_builder, kinds) if b is not None and (
        # DeepSpeed builds its comm op only where it deems it compatible (deepspeed/comm/torch.py)
        b.NAME != "deepspeed_shm_comm" or deepspeed.ops.__compatible_ops__.get(b.NAME, False))]
    root, states = extensions_dir(), []
    for builder in builders:
        name, lock = builder.NAME, root / builder.NAME / "lock"
        deadline = time.monotonic() + lock_wait
        while lock.exists() and time.monotonic() < deadline:  # a live build (another job) ends and removes it
            time.sleep(0.5)
        if lock.exists():
            age = (time.time() - lock.stat().st_mtime) / 60
            report.line("FAIL", "deepspeed ops", f"{lock} ({age:.0f} min old) is left by a {name} build that was "
                        "killed, and every DeepSpeed run would wait on it forever: delete it")
        elif installed_ops.get(name) or (root / name / f"{name}.so").is_file():
            states.append(f"{name} built")
        elif not builder.is_compatible(verbose=False):
            report.line("FAIL", "deepspeed ops", f"{name} cannot be built here: {builder.error_log or 'incompatible'}")
        elif not is_ninja_available():
            report.line("FAIL", "deepspeed ops", f"{name} must be JIT-built and ninja is missing: pip install ninja")
        else:
            states.append(f"{name} will be JIT-built on first use (once, about a minute)")
    if states:
        report.line("ok", "deepspeed ops", f"{'; '.join(states)} (in {root})")


def check_libaio(report: Report, offload: tuple[str, str] | None) -> None:
    nvme = offload is not None and "nvme" in offload
    try:
        from deepspeed.accelerator import get_accelerator
        usable = get_accelerator().create_op_builder("AsyncIOBuilder").is_compatible(verbose=False)
    except ImportError:
        usable = False
    if usable or not nvme:
        return report.line("ok", "libaio", f"{'usable' if usable else 'not found'}; only NVMe offload needs it")
    report.line("FAIL", "libaio", "NVMe offload needs libaio, which is missing: apt-get install libaio-dev")


def check_world(report: Report, timeout: float) -> None:
    """All ranks: count arrivals in the launcher's store before starting the process group, so a
    process that never comes is named instead of ending in a socket timeout inside gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return  # one process, or no launcher store: the process group's own timeout bounds the wait
    import torch.distributed as dist

    addr, port = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
    store = dist.TCPStore(addr, int(port), is_master=False, timeout=timedelta(seconds=timeout))
    key = f"toolkit.doctor/{os.environ.get('TORCHELASTIC_RUN_ID')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT')}"
    store.add(key, 1)
    deadline = time.monotonic() + timeout
    while (joined := store.add(key, 0)) < world and time.monotonic() < deadline:
        time.sleep(0.2)
    if joined < world:
        report.line("FAIL", "world", f"the process group could not form: {joined} of {world} processes joined within "
                    f"{timeout:g} s; check that the launch runs on all {os.environ.get('GROUP_WORLD_SIZE', '?')} "
                    f"machines with the same config and main process {addr}:{port}, and that no process exited early")
        report.stop_if_failed()
    report.line("ok", "world", f"{world} of {world} processes joined")


def check_collectives(report: Report, accelerator, mib: int = 32, reps: int = 3) -> None:
    """All ranks: all_reduce and all_gather of `mib` MiB, checked and timed; bus bandwidth as
    nccl-tests defines it, comparable across world sizes."""
    import torch
    import torch.distributed as dist

    n, device = accelerator.num_processes, accelerator.device
    if n == 1:
        return report.line("ok", "collectives", "one process: nothing to exchange")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    numel = mib * 2**20 // 4
    x = torch.full((numel,), float(accelerator.process_index + 1), device=device)
    shard, gathered = x[: numel // n].clone(), [torch.empty(numel // n, device=device) for _ in range(n)]
    ops = {"all_reduce": (lambda: dist.all_reduce(x), 2 * (n - 1) / n,  # all ranks
                          lambda: x[0].item() == n * (n + 1) / 2),
           "all_gather": (lambda: dist.all_gather(gathered, shard), (n - 1) / n,  # all ranks
                          lambda: [g[0].item() for g in gathered] == [r + 1.0 for r in range(n)])}
    for name, (op, factor, right) in ops.items():
        op()  # warm-up, and the one result we can predict
        correct = right()
        sync()
        dist.barrier()  # all ranks
        start = time.perf_counter()
        for _ in range(reps):
            op()
        sync()
        seconds = (time.perf_counter() - start) / reps
        report.line("ok" if correct else "FAIL", name, f"{mib} MiB in {seconds * 1e3:.1f} ms: "
                    f"{factor * mib * 2**20 / seconds / 1e9:.2f} GB/s bus bandwidth"
                    + ("" if correct else f"; {name} returned wrong values: the process group is broken"))


def check_strategy(report: Report, accelerator, cfg: RunConfig) -> None:
    """All ranks: the trainer's own check after `prepare`, on a tiny OPT, after one real step."""
    import torch

    from .model import PRESETS, preset_model
    from .strategy import check_optimizer, verify

    try:
        check_optimizer(accelerator, cfg)
        model = preset_model("tiny-opt", seed=0)  # the same initial weights on every rank
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        model, optimizer = accelerator.prepare(model, optimizer)  # all ranks
        ids = torch.randint(4, PRESETS["tiny-opt"]["vocab_size"], (2, 32), device=accelerator.device)
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)  # all ranks
        optimizer.step()
        facts = verify(accelerator, model, optimizer, cfg)  # all ranks
    except Exception as e:  # UserError from verify, or whatever prepare or the step raised: one line
        return report.line("FAIL", "strategy", str(e).splitlines()[0] if isinstance(e, UserError) else
                           f"{type(e).__name__} in prepare or the first step: {str(e).splitlines()[0]}")
    skip = ("versions", "micro_batch_size", "grad_accum_steps", "global_batch_size")
    facts = " ".join(f"{k}={v}" for k, v in facts.items() if k not in skip)
    if not torch.isfinite(loss):
        return report.line("FAIL", "strategy", f"the first step's loss is {loss.item()}: {facts}")
    report.line("ok", "strategy", f"{facts} loss={loss.item():.3f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="toolkit.doctor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs", help="where runs will write (checked for space)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds to wait for every process to join, for any collective and for a build lock")
    args = parser.parse_args(argv)
    import torch.distributed as dist

    from .strategy import make_accelerator

    report = Report()
    check_versions(report)
    check_devices(report)
    check_output_dir(report, args.output_dir)
    offload = Requested.offload()
    check_deepspeed_ops(report, offload, lock_wait=args.timeout)
    check_libaio(report, offload)
    # A stale build lock would hang the process group's start: stop before it (the other
    # processes then report this one missing).
    report.stop_if_failed()
    check_world(report, args.timeout)  # all ranks

    cfg = RunConfig(output_dir=args.output_dir)
    cfg.train.collective_timeout = args.timeout
    try:
        accelerator = make_accelerator(cfg)  # all ranks
    except dist.DistError as e:
        raise UserError(f"the process group could not form within {args.timeout:g} s: "
                        f"{str(e).splitlines()[0]}") from None
    backend = dist.get_backend() if dist.is_initialized() else "none"
    report.line("ok", "process group", f"backend {backend}, world size {accelerator.num_processes}")
    check_collectives(report, accelerator)  # all ranks
    check_strategy(report, accelerator, cfg)  # all ranks
    accelerator.end_training()  # all ranks
    report.stop_if_failed()
    if report.rank == 0:
        print("all checks passed", flush=True)


if __name__ == "__main__":
    run_cli(main)
