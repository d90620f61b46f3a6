"""The toolkit against transformers.Trainer measured both ways in one sitting: whole runs one after
another, and in turns step by step (run.py's way).

    python benchmarks/whole_runs.py --rounds 2 --work /tmp/whole-runs
    python benchmarks/whole_runs.py --rounds 2 --strategies fsdp zero3   # against DDP, 2 processes

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


def whole_run_seconds(bench: Bench, name: str, steps: int, processes: int = 1) -> float:
    """Wall time of one whole `accelerate launch` for `steps` optimizer steps: of the Trainer
    (name "trainer"), or of the toolkit under the accelerate config `name` ("toolkit": single)."""
    bench.mode = dict(bench.mode, steps=steps)
    if name == "trainer":
        config, program = "single", bench.peer_program("trainer", processes)
    else:
        config = "single" if name == "toolkit" else name
        program = bench.toolkit_program(bench.work / "toolkit", processes)
    started = time.perf_counter()
    bench.launch(config, program, processes, f"{name}-{steps}")
    return time.perf_counter() - started


def seconds_per_step(bench: Bench, names: list[str], rounds: int, processes: int = 1) -> dict[str, list[float]]:
    """Per round and program: (wall time of a LONG-step run - of a SHORT-step run) / (LONG - SHORT),
    the runs alternated (every program's long run, then every program's short one)."""
    per_step = {name: [] for name in names}
    for _ in range(rounds):
        walls = {(name, steps): whole_run_seconds(bench, name, steps, processes)
                 for steps in (LONG, SHORT) for name in names}
        for name in names:
            per_step[name].append((walls[name, LONG] - walls[name, SHORT]) / (LONG - SHORT))
    return per_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--strategies", nargs="+", metavar="CONFIG",
                        help="instead: these accelerate configs against DDP, whole runs of 2 processes")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="whole-runs-"))
    bench = Bench("full", work)
    bench.prepare()

    if args.strategies:
        whole_run_seconds(bench, "ddp", 1, 2)  # tokenizes the text once, before anything is timed
        result = {}
        for config in args.strategies:
            per_step = seconds_per_step(bench, ["ddp", config], args.rounds, processes=2)
            ratios = [ddp / other for ddp, other in zip(per_step["ddp"], per_step[config])]
            result[config] = {"seconds_per_step": per_step, "vs_ddp": ratios, "median": statistics.median(ratios)}
        print(json.dumps(result, indent=2))
        if args.json:
            args.json.write_text(json.dumps({"strategies_whole_runs": result, "machine": machine()}, indent=2) + "\n")
        return

    per_step = seconds_per_step(bench, ["toolkit", "trainer"], args.rounds)
    tokens = bench.peer_tokens("trainer", 1)  # the same 8 x 128 tokens a step for both
    whole = [trainer / toolkit for toolkit, trainer in zip(per_step["toolkit"], per_step["trainer"])]

    bench.mode = dict(bench.mode, steps=10)
    ours, theirs = bench.toolkit_against("trainer", 1)
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
