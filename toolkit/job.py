"""What a job needs to end well on a cluster: every rank stops together, on an error or a signal,
workers die with their launcher, and only one run writes into an output_dir.

- `stop_together`: an error on one rank (a failed write on the main process, bad data found
  inside `main_process_first`) ends every rank at once with that error. Without it the other
  ranks wait in their next collective until it times out, then print a gloo traceback.
- `StopSignal`: SIGTERM/SIGINT/SIGUSR1 (preemption, Ctrl-C, a dead launcher, a scheduler's warning
  of its time limit) asks for a stop; the loop
  asks `requested(accelerator)` every `train.stop_check_every` optimizer steps, so all ranks agree
  on the same step, save a checkpoint and exit 0.
- Votes among ranks (`vote`) travel over a gloo group of their own on the CPU: they never wait for
  a GPU, and some may wait longer than train.collective_timeout (`main_process_first`).
- `follow_launcher`: torch's launcher starts workers in sessions of their own, so killing it
  (even its process group) leaves them training on as orphans; the kernel's parent-death signal
  sends them SIGTERM instead.
- `OutputLock`: host, PID and start time of the run writing into output_dir.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import signal
import socket
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch

from .config import PeerStopped, UserError


# --- errors on one rank -------------------------------------------------------------------------


# Rank 0 preprocessing a large corpus for the first time, or deleting old checkpoints, may take
# longer than any collective should wait for a stalled rank: the ranks waiting for it wait this long.
PATIENT = timedelta(days=7)


@functools.cache
def host_group():
    """A gloo group of every rank for the job's own votes. Its tensors stay on the CPU, so a vote never
    waits for a GPU, and its timeout is PATIENT: each vote passes the deadline it needs (`vote`).
    Created by every rank at its first vote; every rank reaches that vote at the same point."""
    return torch.distributed.new_group(backend="gloo", timeout=PATIENT)


def vote(values: list, timeout: timedelta | None) -> list[int]:
    """All ranks: the sums over ranks of `values` (ints or bools), waiting at most `timeout` for the
    other ranks (None: PATIENT)."""
    counts = torch.tensor([int(v) for v in values], dtype=torch.int64)
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        try:
            torch.distributed.all_reduce(counts, group=host_group(), async_op=True).wait(timeout or PATIENT)
        except RuntimeError as e:  # gloo's "Operation timed out!" names no backend: say it is one
            raise torch.distributed.DistBackendError(f"gloo vote: {e}") from None
    return counts.tolist()


def agree(accelerator, error: Exception | None, patient: bool = False) -> None:
    """All ranks: raise on every rank if any rank has an error: the error itself where it
    happened (printed there, unless the main process has one to print), `PeerStopped` elsewhere.
    `patient`: wait for the other ranks without train.collective_timeout's deadline."""
    failed, main_failed = vote([error is not None, error is not None and accelerator.is_main_process],
                               None if patient else _vote_timeout)
    if error is not None:
        error.print_here = not main_failed  # the main process speaks for the job when it can
        raise error
    if failed:
        raise PeerStopped()


def wait_for_peers_at_most(timeout: timedelta) -> None:
    """The deadline of votes that are not patient: the process group's (train.collective_timeout)."""
    global _vote_timeout
    _vote_timeout = timeout


_vote_timeout: timedelta | None = None  # None: PATIENT


@contextmanager
def stop_together(accelerator, describe=None, patient: bool = False):
    """All ranks run the block; if it raised on any rank, it raises on every rank (see `agree`).
    `describe` turns an OSError into the one-line message users see. `patient`: the block may take
    longer than train.collective_timeout on some rank (preprocessing, deleting files)."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - every error must reach the other ranks before it propagates
        agree(accelerator, UserError(describe(e)) if describe and isinstance(e, OSError) else e, patient)
    else:
        agree(accelerator, None, patient)


@contextmanager
def main_process_first(accelerator):
    """accelerate's `main_process_first` (the main process fills caches, the others then reuse
    them), but an error on any rank ends every rank at once instead of leaving them in a barrier,
    and the waiting ranks wait as long as the main process works (a large corpus tokenized for the
    first time may take hours), not train.collective_timeout."""
    if not accelerator.is_main_process:
        agree(accelerator, None, patient=True)  # wait for the main process's verdict
    with stop_together(accelerator, patient=True):
        yield
    if accelerator.is_main_process:
        agree(accelerator, None, patient=True)  # wait for the other ranks' verdict


# --- signals ------------------------------------------------------------------------------------


class StopSignal:
    """Records SIGTERM/SIGINT/SIGUSR1 instead of dying mid-step; the loop stops at the next step
    boundary. SIGUSR1 is what Slurm sends before a job's time limit (`--signal`, examples/slurm)."""

    def __init__(self):
        self.received: int | None = None
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        # A second Ctrl-C means "now". A repeated SIGTERM does not: a launcher dying can deliver
        # one from its own clean-up and one as our parent-death signal, within milliseconds.
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = self.received or signum

    def requested(self, accelerator) -> bool:
        """All ranks, at the same steps: whether any rank received a signal (a vote on the CPU, so
        the host never waits for the device to learn it)."""
        return bool(vote([self.received is not None], _vote_timeout)[0])


PR_SET_PDEATHSIG = 1


def follow_launcher() -> None:
    """Under a launcher (torchrun / accelerate launch set TORCHELASTIC_RUN_ID), have the kernel send
    SIGTERM when the launcher dies, so the worker saves and exits like a preempted one."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not hasattr(os, "getppid"):
        return
    launcher = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: no parent-death signal
        return
    if os.getppid() != launcher:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


# --- one writer per output_dir --------------------------------------------------------------------

UNREADABLE_LOCK_WAIT_SECONDS = 2.0  # how long an empty or garbled lock is re-read before it is refused


class OutputLock:
    """`output_dir/.lock`, created exclusively by the main process and removed when the run ends.
    A lock whose process no longer exists on this host is taken over; one from another host is
    refused (its process cannot be checked from here), and so is one that can't be read."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / ".lock"
        self.mine = {"host": socket.gethostname(), "pid": os.getpid(), "started": _process_start(os.getpid()),
                     "since": time.strftime("%Y-%m-%d %H:%M:%S"), **_slurm_attempt()}
        while not self._create():
            holder = self._readable_holder()
            if holder is None:
                continue  # it was released meanwhile: try again
            self._take_over_or_refuse(holder)

    def _create(self) -> bool:
        """Whether the lock is now ours. It appears with its content, linked from a complete file:
        a lock created empty and then written could be read empty, as dead, and taken over."""
        temp = self.path.with_name(f".lock.{self.mine['host']}.{self.mine['pid']}.{time.monotonic_ns()}")
        temp.write_text(json.dumps(self.mine))
        try:
            os.link(temp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError as e:  # the temp file was written, so the directory is writable
            raise UserError(f"output_dir {self.path.parent} cannot hold the run's lock ({e.strerror}: it needs "
                            "hard links): choose an output_dir on another filesystem") from None
        finally:
            temp.unlink(missing_ok=True)

    def _holder(self) -> dict | None:
        return self._holder_at(self.path)

    def _readable_holder(self) -> dict | None:
        """The holder, waiting a little while the lock can't be read: an older toolkit created it
        empty, then wrote it. One that stays unreadable is refused, never taken over: its run may live."""
        deadline = time.monotonic() + UNREADABLE_LOCK_WAIT_SECONDS
        while (holder := self._holder()) == {}:
            if time.monotonic() > deadline:
                raise UserError(f"output_dir {self.path.parent} has a lock that cannot be read ({self.path} is "
                                f"empty or garbled): if no run is active in it, delete {self.path}")
            time.sleep(0.1)
        return holder

    @staticmethod
    def _holder_at(path: Path) -> dict | None:
        """The lock's content: None if there is no lock, {} if it can't be read."""
        try:
            holder = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, OSError):  # empty or garbled
            return {}
        return holder if isinstance(holder, dict) and {"host", "pid", "since"} <= holder.keys() else {}

    def _take_over_or_refuse(self, holder: dict) -> None:
        who = f"PID {holder['pid']} on {holder['host']} (since {holder['since']})"
        if _earlier_attempt_of_this_job(holder, self.mine):  # Slurm starts a requeued job once the last has ended
            print(f"note: taking over {self.path} from {who}, an earlier attempt of Slurm job "
                  f"{holder['slurm_job']}", flush=True)
            self.path.unlink(missing_ok=True)
            return
        if holder["host"] != socket.gethostname():
            raise UserError(f"output_dir {self.path.parent} is in use by {who}: wait for that run, or if no run "
                            f"is active on {holder['host']} delete {self.path}")
        if _alive(holder["pid"], holder.get("started")):
            raise UserError(f"output_dir {self.path.parent} is in use by {who}: wait for it to finish or stop "
                            "it, or choose another output_dir")
        print(f"note: taking over {self.path} from {who}, which no longer runs", flush=True)
        self.path.unlink(missing_ok=True)

    def release(self) -> None:
        holder = self._holder()
        if holder is not None and holder.get("pid") == self.mine["pid"] and holder.get("host") == self.mine["host"]:
            self.path.unlink(missing_ok=True)


def check_shared(accelerator, lock: OutputLock | None, output_dir: Path) -> None:
    """All ranks: each machine's first process must see the main process's lock file, or ranks on
    different machines would write checkpoints into different directories."""
    from accelerate.utils import broadcast_object_list

    if accelerator.num_processes == 1:
        return
    holder = broadcast_object_list([lock.mine if lock else None])[0]
    if accelerator.is_local_main_process and not accelerator.is_main_process:
        seen = OutputLock._holder_at(Path(output_dir) / ".lock")
        if seen != holder:
            raise UserError(f"output_dir {output_dir} is not shared: the main process's {output_dir}/.lock is not "
                            f"visible on {socket.gethostname()}; put output_dir on a filesystem every machine "
                            "mounts (NFS, Lustre, ...)")


def _slurm_attempt() -> dict:
    """Which Slurm job and attempt (requeues counted) this is, if any."""
    if "SLURM_JOB_ID" not in os.environ:
        return {}
    return {"slurm_job": os.environ["SLURM_JOB_ID"], "slurm_attempt": int(os.environ.get("SLURM_RESTART_COUNT", "0"))}


def _earlier_attempt_of_this_job(holder: dict, mine: dict) -> bool:
    """A lock left by an earlier attempt of the same Slurm job (killed after its grace time, perhaps on
    another node): Slurm requeues a job only after every process of its last attempt has ended."""
    return ("slurm_job" in mine and holder.get("slurm_job") == mine["slurm_job"]
            and isinstance(holder.get("slurm_attempt"), int) and holder["slurm_attempt"] < mine["slurm_attempt"])


def _process_start(pid: int) -> str | None:
    """The start time of `pid` in clock ticks since boot (Linux), to tell a reused PID apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: str | None) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return started is None or _process_start(pid) in (None, started)
