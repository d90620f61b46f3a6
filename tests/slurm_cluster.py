"""A real Slurm on this one host: munged, slurmctld and one slurmd per emulated node, each node its
own daemon on its own loopback port (`slurmd -N n1`), all started as child processes from a
slurm.conf in a temporary directory, and stopped (exactly those, whatever the outcome) by `stop`.

Needs Debian's slurm-wlm and munge (`make setup` installs them where it runs as root) and root,
as slurmd must be to start jobs as the submitting user. `SlurmCluster.unavailable()` says why not.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
COMMANDS = ("sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel", "sacct")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    def __init__(self, workdir: Path, nodes: int = 2, cpus_per_node: int = 2):
        self.dir = Path(workdir)
        self.nodes = [f"n{i + 1}" for i in range(nodes)]
        self.cpus = cpus_per_node
        self.conf = self.dir / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.children: list[subprocess.Popen] = []

    @staticmethod
    def unavailable() -> str | None:
        """Why no cluster can start here, or None."""
        missing = [p for p in DAEMONS + COMMANDS if shutil.which(p) is None
                   and not Path("/usr/sbin", p).exists()]
        if missing:
            return f"Slurm is not installed (missing {', '.join(missing)}): `make setup` installs slurm-wlm and munge as root"
        if os.geteuid() != 0:
            return "slurmd must run as root to start jobs"
        return None

    # --- start / stop -----------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> "SlurmCluster":
        try:
            self._write_config()
            self._start_munge()
            self._spawn("slurmctld", "-D", "-f", str(self.conf))
            for node in self.nodes:
                self._spawn("slurmd", "-D", "-N", node, "-f", str(self.conf))
            self._wait_until_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop what `start` started: jobs still there (a failed test's) are cancelled, then the
        slurmds, the controller and munged are stopped."""
        if self.children and all(c.poll() is None for c in self.children):
            jobs = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
            if jobs:
                self.run("scancel", "--full", *jobs, check=False)
                deadline = time.monotonic() + 60  # KillWait (30 s) and more
                while self.run("squeue", "-h", "-o", "%i", check=False).stdout.split() and time.monotonic() < deadline:
                    time.sleep(1)
        for child in reversed(self.children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
                try:
                    child.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
        self.children.clear()
        for pid in self._step_daemons():  # a slurmstepd still reporting to a slurmd that is gone waits forever
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _step_daemons(self) -> list[int]:
        """The slurmstepd processes of this cluster's slurmds (they inherit its SLURM_CONF)."""
        mine = f"SLURM_CONF={self.conf}".encode() + b"\0"
        found = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and (entry / "comm").read_text().strip() == "slurmstepd" \
                        and mine in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:  # gone meanwhile
                pass
        return found

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _write_config(self) -> None:
        d = self.dir
        for sub in ("state", "munge", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        ctld_port = _free_port()
        node_lines = "\n".join(f"NodeName={n} NodeAddr=127.0.0.1 NodeHostname={n} Port={_free_port()} "
                               f"CPUs={self.cpus} RealMemory=1000 State=UNKNOWN" for n in self.nodes)
        self.conf.write_text(f"""\
ClusterName=toolkit-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={d}/munge/munge.socket
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/state/spool-%n
SlurmctldPidFile={d}/state/slurmctld.pid
SlurmdPidFile={d}/state/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
# No cgroups here: processes are tracked by parentage, tasks are not confined.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SlurmdParameters=config_overrides
# A job's steps get SIGTERM, then SIGKILL this many seconds later (scancel, time limit, requeue).
KillWait=30
MinJobAge=600
# A job in `urgent` preempts (requeues) jobs of `main` on the nodes it needs.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
{node_lines}
PartitionName=main Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES PriorityTier=1
PartitionName=urgent Nodes={','.join(self.nodes)} MaxTime=INFINITE State=UP PriorityTier=2
""")

    def _start_munge(self) -> None:
        key = self.dir / "munge" / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o600)
        m = self.dir / "munge"
        # --force: munged refuses to run as root otherwise; its own socket, so the host's munged is untouched
        self._spawn("munged", "--foreground", "--force", f"--key-file={key}", f"--socket={m}/munge.socket",
                    f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed")
        deadline = time.monotonic() + 20
        while not (m / "munge.socket").exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"munged did not start: {self._log(m / 'munged.log')}")
            time.sleep(0.1)

    def _spawn(self, program: str, *args: str) -> None:
        log = open(self.dir / "log" / f"{program}-{len(self.children)}.out", "w")
        self.children.append(subprocess.Popen([program, *args], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))

    def _wait_until_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            lines = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.splitlines()
            states = dict(line.split() for line in lines if len(line.split()) == 2)  # a line per node and partition
            if list(states.values()).count("idle") == len(self.nodes):
                return
            dead = [c.args[0] for c in self.children if c.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"Slurm nodes not idle ({states}; exited: {dead}):\n"
                                   + self._log(self.dir / "log" / "slurmctld.log"))
            time.sleep(0.3)

    @staticmethod
    def _log(path: Path) -> str:
        return path.read_text(errors="replace")[-3000:] if path.exists() else f"({path} missing)"

    # --- using it ---------------------------------------------------------------------------------

    def run(self, *cmd: str, check: bool = True, cwd=None, env=None) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env={**self.env, **(env or {})}, cwd=cwd, capture_output=True, text=True,
                              timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def sbatch(self, *args: str, cwd, env=None) -> str:
        """Submit; the job id."""
        return self.run("sbatch", "--parsable", *args, cwd=cwd, env=env).stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "-o", "show", "job", job_id).stdout
        return dict(field.split("=", 1) for field in out.split() if "=" in field)

    def wait_for(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout} s\n" + self.logs())
            time.sleep(0.5)

    def wait_done(self, job_id: str, timeout: float) -> dict:
        """The job's record once it has ended (COMPLETED, FAILED, TIMEOUT, ...)."""
        record: dict = {}

        def ended():
            nonlocal record
            record = self.job(job_id)
            return record["JobState"] not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED",
                                              "SUSPENDED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING")
        self.wait_for(ended, timeout, f"end of job {job_id}")
        return record

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{self._log(p)}" for p in sorted((self.dir / "log").glob("*.log")))
