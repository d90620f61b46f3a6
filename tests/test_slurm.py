"""examples/slurm/ against a real Slurm: two emulated nodes on this host (tests/slurm_cluster.py),
jobs submitted with sbatch exactly as the README says, reading this checkout and writing under the
test's tmp dir (both nodes see the same filesystem, as on a cluster with a shared one).

Every job is compared with one run of 2 processes on one node under ddp.yaml (`one_node`): a
2-node x 1-process job must train like it, and so must a job stopped by a signal or by its time
limit's warning, requeued, and resumed."""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from pathlib import Path

import pytest

from conftest import ROOT, launch, logged_steps, metrics, runtime, tiny_run
from slurm_cluster import SlurmCluster

pytestmark = [pytest.mark.distributed, pytest.mark.slurm]

TRAIN = str(ROOT / "examples" / "slurm" / "train.sbatch")
FP32 = ["--mixed_precision", "no"]
RUN_CONFIG = "examples/demo.yaml"  # with tiny-run overrides
# Constant LR and a fixed data order: where a run stops, or how long it is, does not change what a
# step computes, so every job compares with a prefix of one long run. One thread per process: each
# emulated node would take both cores of this host (a node's share of its own cores), and another
# thread count sums matrix products in another order.
RUN = {"train.micro_batch_size": 2, "train.grad_accum_steps": 2, "train.max_steps": 40, "eval.every": 0,
       "train.cpu_threads": 1, "checkpoint.every": 4}
LONGEST = 300  # steps of the longest job (the time-limit test's)
# The same strategy on one node or two does the same arithmetic: 1e-6 leaves room for float
# formatting only. ZeRO-3 against DDP: the strategy tests' tolerance over as few steps (other
# summation orders, whose differences grow with the steps: 6e-5 after 22).
LOSS_RTOL = {"ddp": 1e-6, "zero3": 1e-5}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = SlurmCluster.unavailable()
    if why:
        if os.environ.get("CI"):
            pytest.fail(why)  # CI installs Slurm: its absence there is a set-up bug
        pytest.skip(why)
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as running:
        yield running


@pytest.fixture(scope="module")
def one_node(text_data, tmp_path_factory):
    """`assert_like_one_node(out, config)`: the job's per-step training losses equal those of 2 ddp
    processes on one node (no Slurm), run once for the whole module, when first needed."""
    @functools.cache
    def reference() -> list[float]:
        out = tmp_path_factory.mktemp("one_node")
        launch("toolkit.train", ["--config", RUN_CONFIG, *tiny_run(text_data, out, **{**RUN, "train.max_steps": LONGEST})],
               config="ddp", extra=FP32)
        return losses(out)

    def assert_like_one_node(out: Path, config: str = "ddp") -> None:
        job = losses(out)
        assert job == pytest.approx(reference()[:len(job)], rel=LOSS_RTOL[config])
    return assert_like_one_node


def losses(out: Path) -> list[float]:
    records = metrics(out)[0]
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    return [r["loss"] for r in records]


def submit(cluster, tmp_path, config: str, overrides: list[str], *sbatch_args: str, **env) -> str:
    """`sbatch --nodes=2 [sbatch_args] examples/slurm/train.sbatch accelerate_configs/<config>.yaml
    RUN_CONFIG overrides...` from the checkout, as a user would."""
    environment = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "ACCELERATE_ARGS": " ".join(FP32),
                   "TOKENIZERS_PARALLELISM": "false", **env}
    return cluster.sbatch("--nodes=2", f"--output={tmp_path}/slurm-%j.out", *sbatch_args, TRAIN,
                          f"accelerate_configs/{config}.yaml", RUN_CONFIG, *overrides,
                          cwd=ROOT, env=environment)


def job_log(tmp_path, job_id: str) -> str:
    """The job's output file. Both nodes' progress bars write into it at once and can split a
    character's bytes: decode what is there, replacing what is not UTF-8."""
    path = tmp_path / f"slurm-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else "(no output yet)"


def finished(cluster, tmp_path, job_id: str, timeout: float = 300) -> dict:
    record = cluster.wait_done(job_id, timeout)
    assert record["JobState"] == "COMPLETED", f"{record['JobState']}:\n{job_log(tmp_path, job_id)}"
    return record


def requeued(cluster, job_id: str, attempts: int, time_limit: str | None = None, timeout: float = 120) -> None:
    """Wait until the job has been requeued `attempts` times; then let it start at once: Slurm holds a
    requeued job for two minutes before it may start again (its EligibleTime), which only costs
    time here. `time_limit`: give the next attempt this limit."""
    def pending_again():
        record = cluster.job(job_id)
        return int(record["Restarts"]) >= attempts and record["JobState"] == "PENDING"
    cluster.wait_for(pending_again, timeout, f"requeue of job {job_id}")
    print(f"job {job_id} requeued, eligible at {cluster.job(job_id)['EligibleTime']}")
    cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now",
                *([f"TimeLimit={time_limit}"] if time_limit else []))


def test_a_two_node_ddp_job_trains_like_two_processes_on_one_node_then_is_evaluated(cluster, one_node, text_data,
                                                                                       tmp_path):
    out = tmp_path / "run"
    job_id = submit(cluster, tmp_path, "ddp", tiny_run(text_data, out, **RUN), DOCTOR="1", EVAL="1")
    finished(cluster, tmp_path, job_id)
    log = job_log(tmp_path, job_id)
    assert "2 node(s) x 1 process(es)" in log
    assert "all checks passed" in log and re.search(r"ok +world +2 of 2 processes joined", log), log  # DOCTOR=1
    one_node(out)

    # EVAL=1 submitted eval.sbatch with afterok on this job: it scores every checkpoint kept and final/
    report = out / "eval_report.json"
    cluster.wait_for(lambda: report.exists(), 180, f"{report}")
    rows = json.loads(report.read_text())["results"]
    assert [row["step"] for row in rows] == [36, 40, 40] and rows[-1]["checkpoint"].endswith("final")
    assert report.stat().st_mtime > (out / "final").stat().st_mtime


def test_a_two_node_zero3_job_trains_like_two_processes_on_one_node(cluster, one_node, text_data, tmp_path):
    """Under DeepSpeed, accelerate's default multi-node launcher would start a world per node; the
    script takes the standard one, so both nodes join one world."""
    out = tmp_path / "run"
    job_id = submit(cluster, tmp_path, "zero3", tiny_run(text_data, out, **{**RUN, "train.max_steps": 8}))
    finished(cluster, tmp_path, job_id)
    info = runtime(out)
    assert (info["distributed_type"], info["zero_stage"], info["num_processes"]) == ("DEEPSPEED", 3, 2)
    one_node(out, "zero3")


def stops(tmp_path, job_id: str) -> list[int]:
    """The steps the job's attempts stopped at after a signal, in order (each node's main process says it)."""
    return sorted({int(m) for m in re.findall(r"stopped by signal after step (\d+);", job_log(tmp_path, job_id))})


def test_a_job_signalled_requeued_and_preempted_saves_each_time_and_finishes_like_an_uninterrupted_run(
        cluster, one_node, text_data, tmp_path):
    """Three interruptions of one job, one per attempt: `scancel --signal=TERM` reaches the steps only
    and the script requeues the job; `scontrol requeue` and a preemption by a job of a higher
    partition send TERM to the script too, and Slurm requeues it. Each attempt saves where it
    stopped; the last one finishes, and every step's loss is an uninterrupted run's."""
    out, steps = tmp_path / "run", 160
    job_id = submit(cluster, tmp_path, "ddp", tiny_run(text_data, out, **{**RUN, "train.max_steps": steps}))

    def at_step_of_attempt(attempt: int, step: int) -> None:
        cluster.wait_for(lambda: f"attempt {attempt}:" in job_log(tmp_path, job_id)
                         and max(logged_steps(out), default=0) >= step, 180, f"step {step} of attempt {attempt}")

    at_step_of_attempt(0, 3)
    cluster.run("scancel", "--signal=TERM", job_id)  # every process of the job's steps, launchers included
    requeued(cluster, job_id, 1)
    at_step_of_attempt(1, stops(tmp_path, job_id)[-1] + 3)
    cluster.run("scontrol", "requeue", job_id)
    requeued(cluster, job_id, 2)
    at_step_of_attempt(2, stops(tmp_path, job_id)[-1] + 3)
    urgent = cluster.sbatch("--partition=urgent", "--nodes=2", "--exclusive", f"--output={tmp_path}/urgent.out",
                            "--wrap", "srun true", cwd=tmp_path)
    requeued(cluster, job_id, 3)
    assert cluster.job(urgent)["JobState"] in ("RUNNING", "COMPLETING", "COMPLETED")

    finished(cluster, tmp_path, job_id)
    log, stopped = job_log(tmp_path, job_id), stops(tmp_path, job_id)
    assert len(stopped) == 3 and stopped[-1] < steps, log
    assert "requeueing" in log and "DUE TO JOB REQUEUE" in log and "DUE TO PREEMPTION" in log, log
    for stopped_at in stopped:
        assert f"resumed from {out / 'checkpoints' / f'step-{stopped_at:06d}'}" in log, log
    one_node(out)
    assert len(losses(out)) == steps


def test_a_cancelled_job_saves_and_is_not_requeued(cluster, text_data, tmp_path):
    """Plain `scancel`: TERM to every process, the script included; the run saves, and the job stays cancelled."""
    out = tmp_path / "run"
    job_id = submit(cluster, tmp_path, "ddp", tiny_run(text_data, out, **{**RUN, "train.max_steps": LONGEST}))
    cluster.wait_for(lambda: len(logged_steps(out)) >= 3, 180, "step 3")
    cluster.run("scancel", job_id)
    record = cluster.wait_done(job_id, 120)
    assert (record["JobState"], record["Restarts"]) == ("CANCELLED", "0"), job_log(tmp_path, job_id)
    [stopped_at] = stops(tmp_path, job_id)
    assert (out / "checkpoints" / f"step-{stopped_at:06d}" / "trainer_state.json").is_file()
    assert not (out / ".lock").exists()


def test_a_job_warned_of_its_time_limit_saves_requeues_and_finishes_like_an_uninterrupted_run(cluster, one_node,
                                                                                              text_data, tmp_path):
    """A 1-minute limit with the warning due 60 s before it: Slurm sends USR1 at its first check of
    time limits, within 30 s of the start (maybe before the workers listen: the script repeats it).
    Held-out evaluation after every step makes the run outlast that without changing what it trains.
    Once requeued, the limit is raised so that the next attempt finishes."""
    out = tmp_path / "run"
    timed = {**RUN, "train.max_steps": LONGEST}
    job_id = submit(cluster, tmp_path, "ddp", tiny_run(text_data, out, **{**timed, "eval.every": 1}),
                    "--time=1", "--signal=B:USR1@60")
    requeued(cluster, job_id, 1, time_limit="10")
    log = job_log(tmp_path, job_id)
    assert "USR1: stopping at the next step" in log, log
    [stopped_at] = stops(tmp_path, job_id)
    assert stopped_at < timed["train.max_steps"], log

    finished(cluster, tmp_path, job_id)
    assert f"resumed from {out / 'checkpoints' / f'step-{stopped_at:06d}'}" in job_log(tmp_path, job_id)
    one_node(out)
    assert len(losses(out)) == LONGEST
