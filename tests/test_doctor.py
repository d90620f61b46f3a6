"""`toolkit.doctor`: passes where the strategy runs, fails within a bounded time where the world
cannot form, and catches the stale DeepSpeed build lock that would hang every run."""

import os
import re
import subprocess
import sys
import threading
import time

import pytest
import yaml

from conftest import ACCELERATE_CONFIGS, ROOT, free_port, launch
from toolkit import doctor


@pytest.mark.distributed
def test_zero3_passes_and_reports_sharding_and_bandwidth(tmp_path):
    proc = launch("toolkit.doctor", ["--output-dir", str(tmp_path)], config="zero3", extra=["--mixed_precision", "no"])
    out = proc.stdout
    assert "backend gloo, world size 2" in out and out.rstrip().endswith("all checks passed"), out
    strategy = next(line for line in out.splitlines() if line.startswith("ok   strategy"))
    facts = dict(re.findall(r"(\w+)=(\S+)", strategy))
    assert facts["distributed_type"] == "DEEPSPEED" and facts["zero_stage"] == "3", strategy
    assert int(facts["params_local_numel"]) * 2 <= int(facts["params_numel"]) + 1024, strategy  # sharded over 2 ranks
    assert float(re.search(r"all_reduce .* ([\d.]+) GB/s", out).group(1)) > 0, out


def two_machine_config(tmp_path) -> str:
    """ddp.yaml for 2 machines of 1 process each, the first on this one."""
    acc = yaml.safe_load((ACCELERATE_CONFIGS / "ddp.yaml").read_text())
    acc.update(num_machines=2, num_processes=2, main_process_ip="127.0.0.1")
    (tmp_path / "two_machines.yaml").write_text(yaml.safe_dump(acc))
    return str(tmp_path / "two_machines")


@pytest.mark.distributed
def test_a_process_that_never_joins_is_named_within_the_timeout(tmp_path):
    # Both machines' launchers meet, but machine 1 runs something that exits (`--help`) instead of
    # joining: machine 0's doctor must say so after --timeout, not hang in gloo for 30 minutes.
    config, port = two_machine_config(tmp_path), str(free_port())
    # the launcher's own wait for the other machine, bounded in case machine 1 never connects
    common = ["--main_process_port", port, "--rdzv_conf", "timeout=30", "--mixed_precision", "no"]
    machine1 = subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--config_file", config + ".yaml",
                                 "--machine_rank", "1", *common, "-m", "toolkit.doctor", "--help"],
                                cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        start = time.monotonic()
        proc = launch("toolkit.doctor", ["--timeout", "5", "--output-dir", str(tmp_path / "runs")], config=config,
                      extra=["--machine_rank", "0", *common], check=False, timeout=120)
        elapsed = time.monotonic() - start
    finally:
        machine1.kill()
        machine1.wait()
    assert proc.returncode != 0, proc.stdout
    assert "error: the process group could not form: 1 of 2 processes joined within 5 s" in proc.stderr, proc.stderr
    assert elapsed < 60, elapsed  # 5 s of waiting plus start-up; without --timeout: 60 s, torch alone: 30 min


@pytest.mark.distributed
def test_a_machine_that_never_starts_is_bounded_by_the_launcher_flag(tmp_path):
    # With rdzv_backend static the launcher itself waits for the other machine's launcher (600 s
    # unless --rdzv_conf timeout=N) before any of our code runs: the doctor cannot bound or report
    # this one; the flag does, with torch's message.
    start = time.monotonic()
    proc = launch("toolkit.doctor", [], config=two_machine_config(tmp_path), check=False, timeout=120,
                  extra=["--machine_rank", "0", "--main_process_port", str(free_port()), "--rdzv_conf", "timeout=5",
                         "--mixed_precision", "no"])
    elapsed = time.monotonic() - start
    assert proc.returncode != 0 and "versions" not in proc.stdout, proc.stdout
    assert "1/2 clients joined" in proc.stderr, proc.stderr[-3000:]
    assert elapsed < 45, elapsed


def test_stale_build_lock_fails_and_a_live_build_is_waited_for(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ROOT / "ds_configs" / "zero2_offload.json"))
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    offload = doctor.Requested.offload()
    assert offload == ("cpu", "none")  # optimizer offload: cpu_adam will be JIT-built
    lock = tmp_path / "cpu_adam" / "lock"
    lock.parent.mkdir()

    lock.touch()  # a build killed midway
    report = doctor.Report()
    doctor.check_deepspeed_ops(report, offload, lock_wait=0.5)
    assert len(report.failures) == 1 and str(lock) in report.failures[0] and "delete it" in report.failures[0]
    assert f"FAIL deepspeed ops {lock}" in capsys.readouterr().out
    with pytest.raises(doctor.UserError, match="delete it"):
        report.stop_if_failed()

    # another job building right now: its lock goes within the wait, nothing fails
    threading.Timer(0.5, lock.unlink).start()
    report = doctor.Report()
    doctor.check_deepspeed_ops(report, offload, lock_wait=10)
    assert report.failures == [] and "cpu_adam will be JIT-built" in capsys.readouterr().out
