"""Run a training program so that it takes turns with others, one optimizer step each.

    accelerate launch ... benchmarks/lockstep.py --ring DIR --turn K --of N --steps S -- <script | -m module> [args]

The N programs started with the same DIR pass a baton around a ring: after its step, program K
hands the baton to program K+1 and waits until it comes back. Only one program computes at a
time, with the whole machine, and the steps being compared are seconds apart, so a change in the
machine's speed (another tenant of the host, heat) slows them alike. Whole runs one after another
cannot promise that: on the 2-core development VM the same program measured 5.7 then 6.7 s per
step one minute later.

The turn is taken in torch's global optimizer-step hook, which every torch optimizer calls (the
fused AdamW of the toolkit, the reference loop and the Trainer alike), so the programs run
unchanged; under DeepSpeed, after the engine's step (ZeRO-3 steps one optimizer per sub-group).
Each process writes DIR/seconds-K-rank<R>.json: for every step after the first, the
seconds from getting the baton to the end of its optimizer step, i.e. one whole turn of its loop
(logging, the next batch, forward, backward, the step). The first step overlaps the others'
start-up; it ends at a rendezvous of all N programs, after which program 0 goes first.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import select
import sys
import time
from pathlib import Path

from torch.optim.optimizer import register_optimizer_step_post_hook

TIMEOUT_S = 900  # a partner that crashed must not hang the benchmark


class Baton:
    def __init__(self, ring: Path, turn: int, of: int, steps: int):
        rank = int(os.environ.get("RANK", "0"))  # program K's rank R hands over to program K+1's rank R
        self.ring, self.turn, self.of, self.steps, self.rank = ring, turn, of, steps, rank
        self.mine, self.next = self.fifo(turn), self.fifo((turn + 1) % of)
        self.done, self.resumed, self.seconds = 0, None, []

    def fifo(self, turn: int) -> int:
        path = self.ring / f"baton-{turn}-rank{self.rank}"
        try:
            os.mkfifo(path)
        except FileExistsError:
            pass
        return os.open(path, os.O_RDWR)  # read-write: opening never blocks, writing never meets a closed end

    def after_step(self, *_) -> None:
        ended = time.perf_counter()
        self.done += 1
        if self.done > self.steps:
            return
        if self.done == 1:
            self.rendezvous()
            if self.turn:
                self.wait()
        else:
            self.seconds.append(ended - self.resumed)
            self.give()
            self.wait()
            if self.done == self.steps:  # release the next program, which waits for its last baton
                (self.ring / f"seconds-{self.turn}-rank{self.rank}.json").write_text(json.dumps(self.seconds))
                self.give()
        self.resumed = time.perf_counter()

    def rendezvous(self) -> None:
        (self.ring / f"arrived-{self.turn}-rank{self.rank}").touch()
        deadline = time.time() + TIMEOUT_S
        while not all((self.ring / f"arrived-{k}-rank{self.rank}").exists() for k in range(self.of)):
            if time.time() > deadline:
                raise SystemExit(f"lockstep: not every program reached its first step in {TIMEOUT_S} s")
            time.sleep(0.05)

    def give(self) -> None:
        os.write(self.next, b"x")

    def wait(self) -> None:
        if not select.select([self.mine], [], [], TIMEOUT_S)[0]:
            raise SystemExit(f"lockstep: the baton did not come back in {TIMEOUT_S} s")
        os.read(self.mine, 1)


def turn_after_deepspeed_steps(baton: Baton) -> None:
    """ZeRO-3 steps its torch optimizer once per parameter sub-group, so under DeepSpeed the turn is
    taken after the engine's step that moved the model (its global step count went up)."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    engine_step = DeepSpeedEngine.step

    def step(engine, *args, **kwargs):
        before = engine.global_steps
        result = engine_step(engine, *args, **kwargs)
        if engine.global_steps != before:
            baton.after_step()
        return result

    DeepSpeedEngine.step = step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ring", type=Path, required=True)
    parser.add_argument("--turn", type=int, required=True)
    parser.add_argument("--of", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True, help="the program's optimizer steps")
    parser.add_argument("program", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    program = args.program[1:] if args.program[:1] == ["--"] else args.program
    baton = Baton(args.ring, args.turn, args.of, args.steps)
    if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
        turn_after_deepspeed_steps(baton)
    else:
        register_optimizer_step_post_hook(baton.after_step)
    if program[0] == "-m":
        sys.argv = program[1:]
        runpy.run_module(program[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = program
        sys.path.insert(0, str(Path(program[0]).resolve().parent))  # as `python script.py` would
        runpy.run_path(program[0], run_name="__main__")


if __name__ == "__main__":
    main()
