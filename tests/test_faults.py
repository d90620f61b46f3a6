"""Jobs die: preemption, a dead launcher, a dead rank, a second writer, a diverging run.

Each distributed test drives a real 2-process job through `accelerate launch` and the fault a
cluster meets (signals, SIGKILL), and checks what was saved, what was printed and what is left."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import Job, launch, logged_steps, metrics, tiny_run
from toolkit import job

# Long enough that a signal lands mid-run (tiny-opt steps take ~0.1 s here); constant LR, so
# where a run stops does not change what the remaining steps compute.
LONG = {"train.micro_batch_size": 2, "train.grad_accum_steps": 2, "train.max_steps": 60, "eval.every": 0,
        "optim.max_grad_norm": 0.5}
FP32 = ["--mixed_precision", "no"]
# The same strategy, interrupted or not, does the same arithmetic: only the reload of fp32 state
# could differ, and it is exact; 1e-6 leaves room for nothing but float formatting.
LOSS_RTOL = 1e-6


@pytest.fixture(scope="module")
def uninterrupted(text_data, tmp_path_factory):
    runs = {}

    def run(config: str) -> list[dict]:
        if config not in runs:
            out = tmp_path_factory.mktemp(f"uninterrupted_{config}")
            launch("toolkit.train", tiny_run(text_data, out, **LONG), config=config, extra=FP32)
            runs[config] = metrics(out)[0]
        return runs[config]
    return run


@pytest.mark.distributed
@pytest.mark.parametrize("config", ["ddp", "zero3"])
def test_sigterm_saves_exits_and_resumes_exactly(config, uninterrupted, text_data, tmp_path):
    out = tmp_path / "run"
    running = Job("toolkit.train", tiny_run(text_data, out, **LONG), config=config, extra=FP32)
    try:
        # The workers are found first: a scan of /proc (every process's environment) can take seconds
        # on a busy machine, and the signal must land while the run still has steps to go.
        running.wait_for(lambda: len(running.workers()) == 2, what="2 workers")
        rank_1 = running.workers()[1]
        running.wait_for(lambda: len(logged_steps(out)) >= 3, what="step 3")
        signalled = time.monotonic()
        os.kill(rank_1, signal.SIGTERM)  # one rank only: all must agree to stop
        code, stdout, stderr = running.finish(timeout=60)
        elapsed = time.monotonic() - signalled
    finally:
        running.kill_all()
    assert code == 0, stderr[-3000:]
    assert elapsed < 60
    stopped_at = logged_steps(out)[-1]
    assert stopped_at < LONG["train.max_steps"] and not (out / "final").exists()
    assert (out / "checkpoints" / f"step-{stopped_at:06d}" / "trainer_state.json").is_file()
    assert "stopped by signal" in stdout and not (out / ".lock").exists()

    launch("toolkit.train", tiny_run(text_data, out, **LONG, resume="auto"), config=config, extra=FP32)
    resumed = metrics(out)[0]
    assert [r["step"] for r in resumed] == list(range(1, LONG["train.max_steps"] + 1))
    for a, b in zip(uninterrupted(config), resumed):
        assert b["loss"] == pytest.approx(a["loss"], rel=LOSS_RTOL), a["step"]
    print(f"{config}: SIGTERM at step {stopped_at} -> saved and exited in {elapsed:.1f} s")


@pytest.mark.distributed
def test_one_writer_per_output_dir_and_a_killed_launcher_takes_its_workers_with_it(text_data, tmp_path):
    """A second run into a running job's output_dir is refused, naming the holder. Then SIGKILL to
    the launcher's process group: the workers (in sessions of their own) get their parent-death
    signal, save, and exit; nothing writes to the run afterwards."""
    out = tmp_path / "run"
    args = tiny_run(text_data, out, **{**LONG, "train.max_steps": 100000})
    running = Job("toolkit.train", args, config="ddp", extra=FP32)
    try:
        running.wait_for(lambda: len(logged_steps(out)) >= 3, what="step 3")
        workers = running.workers()
        assert len(workers) == 2
        second = launch("toolkit.train", args + ["resume=auto"], config="ddp", extra=FP32, check=False)
        holder = json.loads((out / ".lock").read_text())
        assert holder["pid"] == workers[0]  # held by the main process
        assert second.returncode != 0 and f"in use by PID {holder['pid']} on {holder['host']}" in second.stderr
        steps_before = len(logged_steps(out))
        time.sleep(1)
        assert len(logged_steps(out)) > steps_before  # the running job carries on, unaffected
        os.killpg(running.proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        deadline = killed + 30
        while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
            time.sleep(0.1)
        gone_after = time.monotonic() - killed
        assert not any(_alive(pid) for pid in workers), "workers outlived their launcher by 30 s"
        lines = (out / "metrics.jsonl").read_text()
        time.sleep(2)
        assert (out / "metrics.jsonl").read_text() == lines  # nobody writes any more
    finally:
        running.kill_all()
    _, _, stderr = running.finish()  # what the workers printed (the launcher's files are theirs too)
    stopped_at = logged_steps(out)[-1]
    assert (out / "checkpoints" / f"step-{stopped_at:06d}").is_dir(), stderr[-3000:]  # they saved on the way out
    print(f"workers gone {gone_after:.1f} s after the launcher's SIGKILL, checkpoint at step {stopped_at}")


@pytest.mark.distributed
def test_a_dead_rank_ends_the_whole_job_with_a_clear_message(text_data, tmp_path):
    out = tmp_path / "run"
    running = Job("toolkit.train", tiny_run(text_data, out, **{**LONG, "train.max_steps": 100000,
                                                               "train.collective_timeout": 20}),
                  config="ddp", extra=FP32)
    try:
        running.wait_for(lambda: len(logged_steps(out)) >= 3, what="step 3")
        os.kill(running.workers()[1], signal.SIGKILL)
        killed = time.monotonic()
        code, _, stderr = running.finish(timeout=60)
        elapsed = time.monotonic() - killed
    finally:
        running.kill_all()
    assert code != 0 and elapsed < 30
    assert not running.pids()  # no rank left behind
    print(f"job ended {elapsed:.1f} s after rank 1 was killed (exit {code})")
    assert "error: rank 0 lost contact with another rank" in stderr, stderr[-3000:]


def test_a_diverging_run_ends_with_one_line_and_keeps_its_last_good_checkpoint(text_data, tmp_path):
    """fp32 with infinite gradients at steps 5-7 (tests/instrumented_train.py): each is skipped and
    bad, none is checkpointed, and the third in a row ends the run with one line naming step 4's
    checkpoint, which holds the weights of before the divergence."""
    out = tmp_path / "run"
    run = tiny_run(text_data, out, **{"train.max_steps": 10, "checkpoint.every": 1, "checkpoint.keep_last": 0})
    proc = launch("tests.instrumented_train", ["--overflow-steps", "5,6,7", "--", *run], config=None, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    good = out / "checkpoints" / "step-000004"
    assert errors == [f"error: step 7: loss or gradient not finite for 3 steps in a row (each skipped); the last good "
                      f"checkpoint is {good}: lower optim.lr or raise optim.warmup_steps, then resume from it"]
    train, _ = metrics(out)
    assert [r["step"] for r in train if r.get("skipped")] == [5, 6, 7]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step-{s:06d}" for s in range(1, 5)]
    assert not (out / "final").exists()


@pytest.mark.distributed
def test_preprocessing_longer_than_the_collective_timeout_does_not_end_the_job(text_data, tmp_path):
    """Rank 0 tokenizes (here 20 s longer, as a large corpus seen for the first time would make it)
    while rank 1 waits: it waits as long as that takes, not train.collective_timeout (8 s here)."""
    out = tmp_path / "run"
    run = tiny_run(text_data, out, **{"train.collective_timeout": 8, "data.num_proc": 2, "train.max_steps": 2})
    started = time.monotonic()
    launch("tests.instrumented_train", ["--slow-preprocessing", "20", "--", *run], config="ddp", extra=FP32)
    assert time.monotonic() - started > 20
    assert [r["step"] for r in metrics(out)[0]] == [1, 2] and (out / "final" / "model.safetensors").is_file()


def test_a_stale_lock_is_taken_over_and_a_live_one_refused(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its PID now belongs to no process
    (tmp_path / ".lock").write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid, "started": None,
                                                "since": "earlier"}))
    lock = job.OutputLock(tmp_path)
    assert f"taking over {tmp_path / '.lock'} from PID {dead.pid}" in capsys.readouterr().out
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()

    with pytest.raises(job.UserError, match=f"is in use by PID {os.getpid()} on {os.uname().nodename}"):
        job.OutputLock(tmp_path)  # held by a live process (this one)
    lock.release()
    assert not (tmp_path / ".lock").exists()
    (tmp_path / ".lock").write_text(json.dumps({"host": "other-node", "pid": 1, "started": None, "since": "x"}))
    with pytest.raises(job.UserError, match="in use by PID 1 on other-node .* if no run is active on other-node"):
        job.OutputLock(tmp_path)


def test_a_requeued_slurm_job_takes_over_its_earlier_attempts_lock_from_any_node(tmp_path, monkeypatch, capsys):
    """A preempted attempt killed after its grace time leaves its lock, maybe on another node; the
    same job's next attempt takes it over. Another job's lock, or a later attempt's, is still refused."""
    def holder(job_id, attempt):
        return json.dumps({"host": "other-node", "pid": 1, "started": None, "since": "x", "slurm_job": job_id,
                           "slurm_attempt": attempt})
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    for refused in (holder("76", 0), holder("77", 1)):
        (tmp_path / ".lock").write_text(refused)
        with pytest.raises(job.UserError, match="in use by PID 1 on other-node"):
            job.OutputLock(tmp_path)
    (tmp_path / ".lock").write_text(holder("77", 0))
    lock = job.OutputLock(tmp_path)
    assert "an earlier attempt of Slurm job 77" in capsys.readouterr().out
    assert json.loads((tmp_path / ".lock").read_text())["slurm_attempt"] == 1
    lock.release()


def test_a_lock_that_cannot_be_read_is_waited_for_then_refused_never_taken_over(tmp_path, monkeypatch):
    """An empty .lock is another process between creating and writing it (an older toolkit), or a
    garbled one: neither may be read as "PID -1, dead" and taken over."""
    import threading

    lock = tmp_path / ".lock"
    lock.write_text("")
    monkeypatch.setattr(job, "UNREADABLE_LOCK_WAIT_SECONDS", 0.3)
    with pytest.raises(job.UserError, match=f"has a lock that cannot be read \\({lock} is empty or garbled\\): "
                                            f"if no run is active in it, delete {lock}$"):
        job.OutputLock(tmp_path)
    assert lock.read_text() == ""  # left to its writer

    # A writer that finishes within the wait is then seen as what it is: a live holder.
    monkeypatch.setattr(job, "UNREADABLE_LOCK_WAIT_SECONDS", 10)
    holder = {"host": os.uname().nodename, "pid": os.getpid(), "started": None, "since": "now"}
    writer = threading.Timer(0.3, lambda: lock.write_text(json.dumps(holder)))
    writer.start()
    with pytest.raises(job.UserError, match=f"is in use by PID {os.getpid()} on {os.uname().nodename}"):
        job.OutputLock(tmp_path)
    writer.join()


def test_the_lock_appears_with_its_content(tmp_path, monkeypatch):
    """Created by linking a complete file to .lock: no reader can find it empty."""
    linked = []
    real_link = os.link

    def link(src, dst):
        linked.append((json.loads(open(src).read()), os.path.exists(dst)))
        real_link(src, dst)

    monkeypatch.setattr(os, "link", link)
    lock = job.OutputLock(tmp_path)
    assert linked == [(lock.mine, False)]
    assert [p.name for p in tmp_path.iterdir()] == [".lock"]  # the file it was linked from is gone
    assert json.loads((tmp_path / ".lock").read_text()) == lock.mine
    lock.release()


def test_a_refusal_after_the_lock_is_claimed_releases_it(text_data, tmp_path):
    """check_optimizer refuses after main() has claimed output_dir: the lock must go with the run."""
    out = tmp_path / "run"
    proc = launch("toolkit.train", tiny_run(text_data, out, **{"optim.name": "deepspeed"}), config=None, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "optim.name=deepspeed" in errors[0], proc.stderr[-3000:]
    assert out.is_dir() and not (out / ".lock").exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (dead, not yet reaped by a launcher that is itself gone) counts as dead
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
