"""The toolkit against transformers.Trainer measured both ways in one sitting: whole runs one after
another, and in turns step by step (run.py's way).

    python benchmarks/whole_runs.py --rounds 2 --work /tmp/whole-runs

run.py's job at one process (random-opt-125m, micro batch 8 x 128 tokens, fp32, the same threads
for both). Whole runs: per round, a 9-step and a 3-step `accelerate launch` of each program,
alternated (toolkit 9, Trainer 9, toolkit 3, Trainer 3); a program's seconds per step are the
difference of its two wall times over 6 steps, so start-up, data preparation and the end of the
run cancel, and what is left is what a user timing whole runs sees per step. In turns: the two
programs run at once and take turns optimizer step by optimizer step (lockstep.py), 10 steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from run import Bench, machine

LONG, SHORT = 9, 3


def whole_run_seconds(bench: Bench, name: str, steps: int) -> float:
    """Wall time of one whole `accelerate launch` of the program for `steps` optimizer steps."""
    bench.mode = dict(bench.mode, steps=steps)
    program = (bench.toolkit_program(bench.work / "toolkit", 1) if name == "toolkit"
               else bench.peer_program("trainer", 1))
    started = time.perf_counter()
    bench.launch("single", program, 1, f"{name}-{steps}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="whole-runs-"))
    bench = Bench("full", work)
    bench.prepare()

    per_step = {"toolkit": [], "trainer": []}
    for _ in range(args.rounds):
        walls = {(name, steps): whole_run_seconds(bench, name, steps)
                 for steps in (LONG, SHORT) for name in ("toolkit", "trainer")}
        for name in per_step:
            per_step[name].append((walls[name, LONG] - walls[name, SHORT]) / (LONG - SHORT))
    tokens = bench.peer_tokens("trainer", 1)  # the same 8 x 128 tokens a step for both
    whole = [trainer / toolkit for toolkit, trainer in zip(per_step["toolkit"], per_step["trainer"])]

    bench.mode = dict(bench.mode, steps=10)
    seconds = bench.alternated(1, {"toolkit": ("single", bench.toolkit_program(work / "toolkit", 1)),
                                   "trainer": ("single", bench.peer_program("trainer", 1))})
    ours = [t / s for t, s in zip(bench.toolkit_tokens(work / "toolkit")[bench.mode["warmup"]:], seconds["toolkit"])]
    theirs = [bench.peer_tokens("trainer", 1) / s for s in seconds["trainer"]]
    assert set(bench.toolkit_tokens(work / "toolkit")) == {tokens}, "the two programs' steps differ in tokens"
    in_turns = [a / b for a, b in zip(ours, theirs)]

    result = {
        "whole_runs": {"seconds_per_step": per_step, "tokens_per_step": tokens,
                       "toolkit_vs_trainer": whole, "median": statistics.median(whole)},
        "in_turns": {"tokens_per_s": {"toolkit": statistics.median(ours), "trainer": statistics.median(theirs)},
                     "toolkit_vs_trainer": in_turns, "median": statistics.median(in_turns)},
        "machine": machine(), "work": str(work)}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
