"""What a job needs to end well on a cluster: every rank stops together, on an error or a signal,
workers die with their launcher, and only one run writes into an output_dir.

- `stop_together`: an error on one rank (a failed write on the main process, bad data found
  inside `main_process_first`) ends every rank at once with that error. Without it the other
  ranks wait in their next collective until it times out, then print a gloo traceback.
- `StopSignal`: SIGTERM/SIGINT (preemption, Ctrl-C, a dead launcher) asks for a stop; the loop
  asks `requested(accelerator)` once per optimizer step, so all ranks agree on the same step,
  save a checkpoint and exit 0.
- `follow_launcher`: torch's launcher starts workers in sessions of their own, so killing it
  (even its process group) leaves them training on as orphans; the kernel's parent-death signal
  sends them SIGTERM instead.
- `OutputLock`: host, PID and start time of the run writing into output_dir.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from .config import PeerStopped, UserError


# --- errors on one rank -------------------------------------------------------------------------


def agree(accelerator, error: Exception | None) -> None:
    """All ranks: raise on every rank if any rank has an error: the error itself where it
    happened (printed there, unless the main process has one to print), `PeerStopped` elsewhere."""
    flags = torch.tensor([error is not None, error is not None and accelerator.is_main_process],
                         dtype=torch.float32, device=accelerator.device)
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, "sum")
    if error is not None:
        error.print_here = not flags[1].item()  # the main process speaks for the job when it can
        raise error
    if flags[0].item():
        raise PeerStopped()


@contextmanager
def stop_together(accelerator, describe=None):
    """All ranks run the block; if it raised on any rank, it raises on every rank (see `agree`).
    `describe` turns an OSError into the one-line message users see."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - every error must reach the other ranks before it propagates
        agree(accelerator, UserError(describe(e)) if describe and isinstance(e, OSError) else e)
    else:
        agree(accelerator, None)


@contextmanager
def main_process_first(accelerator):
    """accelerate's `main_process_first` (the main process fills caches, the others then reuse
    them), but an error on any rank ends every rank at once instead of leaving them in a barrier."""
    if not accelerator.is_main_process:
        agree(accelerator, None)  # wait for the main process's verdict
    with stop_together(accelerator):
        yield
    if accelerator.is_main_process:
        agree(accelerator, None)  # wait for the other ranks' verdict


# --- signals ------------------------------------------------------------------------------------


class StopSignal:
    """Records SIGTERM/SIGINT instead of dying mid-step; the loop stops at the next step boundary."""

    def __init__(self):
        self.received: int | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        # A second Ctrl-C means "now". A repeated SIGTERM does not: a launcher dying can deliver
        # one from its own clean-up and one as our parent-death signal, within milliseconds.
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = self.received or signum

    def requested(self, accelerator) -> bool:
        """All ranks, once per step: whether any rank received a signal (one tiny all-reduce)."""
        flag = torch.tensor([self.received is not None], dtype=torch.float32, device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag, "sum")
        return bool(flag.item())


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


class OutputLock:
    """`output_dir/.lock`, created exclusively by the main process and removed when the run ends.
    A lock whose process no longer exists on this host is taken over; one from another host is
    refused (its process cannot be checked from here)."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / ".lock"
        self.mine = {"host": socket.gethostname(), "pid": os.getpid(), "started": _process_start(os.getpid()),
                     "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        while True:
            try:
                with open(self.path, "x") as f:
                    json.dump(self.mine, f)
                return
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    continue  # it was released (or half-written) meanwhile: try again
                self._take_over_or_refuse(holder)

    def _holder(self) -> dict | None:
        return self._holder_at(self.path)

    @staticmethod
    def _holder_at(path: Path) -> dict | None:
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, OSError):  # written by a process killed mid-write
            return {"host": socket.gethostname(), "pid": -1, "started": None, "since": "?"}

    def _take_over_or_refuse(self, holder: dict) -> None:
        who = f"PID {holder['pid']} on {holder['host']} (since {holder['since']})"
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
