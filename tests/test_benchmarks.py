"""The benchmark report (benchmarks/run.py measures; it is not run here, its timing stays out of
the suite): RESULTS.md's speed section is rewritten in place from a results file, with its chart."""

import json
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from report import BEGIN, END, write_speed_section  # noqa: E402


def test_the_speed_section_is_replaced_not_appended(tmp_path):
    results = json.loads((ROOT / "benchmarks" / "results-full.json").read_text())
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# Benchmarks\n\nMemory tables stay.\n")
    for _ in range(2):
        write_speed_section(results, results_md)
    text = results_md.read_text()
    assert text.count(BEGIN) == text.count(END) == 1 and "Memory tables stay." in text
    assert f"| `throughput_vs_trainer` | {results['throughput_vs_trainer']:.3f} |" in text
    assert (tmp_path / "throughput.png").stat().st_size > 1000


def test_the_capacity_section_lists_each_candidate_and_is_replaced_not_appended(tmp_path):
    from capacity import largest, table
    from report import write_capacity_section

    fits = {"strategy": "zero3", "shape": "random-opt-125m", "trains": True, "params": 125_239_296, "seconds": 70,
            "formula_gb": 0.93, "start_peak_gb": [1.51, 1.52], "training_peak_gb": [1.96, 1.97],
            "export_peak_gb": [2.10, 1.97]}
    fails = {"strategy": "zero3", "shape": "random-opt-350m", "trains": False, "seconds": 9,
             "why": "out of memory: 23.0 GB held > limit 22.0 GB"}
    result = {"rows": [fits, fails], "largest": largest([fits, fails]), "memory_limit_gb": 22.0, "machine": "m",
              "seconds": 79, "command": "python benchmarks/capacity.py"}
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# Benchmarks\n\nSpeed tables stay.\n")
    for _ in range(2):
        write_capacity_section(result, table(result["rows"]), results_md)
    text = results_md.read_text()
    assert text.count("capacity:begin") == text.count("capacity:end") == 1 and "Speed tables stay." in text
    assert "Largest that trains: zero3 125m." in text
    assert "| zero3 | random-opt-125m | yes | 125M | 0.93 | 1.51, 1.52 | 1.96, 1.97 | 2.10, 1.97 |  | 70 |" in text
    assert "Export against training, per rank: at most +0.14 GB (zero3, random-opt-125m), within one 2 GB shard" in text
    assert "| zero3 | random-opt-350m | **no**: out of memory" in text


def test_the_capacity_section_sets_each_strategy_against_ddp_at_350m():
    from report import against_ddp

    def row(name, start, training, shape="random-opt-350m"):
        return {"strategy": name, "shape": shape, "trains": True, "start_peak_gb": start,
                "training_peak_gb": training}

    rows = [row("ddp", [3.4, 3.5], [6.0, 6.2]), row("zero3", [2.1, 2.0], [3.5, 3.4]),
            row("fsdp", [9.0, 9.0], [9.0, 9.0], shape="random-opt-125m")]
    assert against_ddp(rows)[0] == "Per-rank peak against ddp at random-opt-350m (at start / in training): " \
                                   "zero3 0.60x / 0.56x."
    assert against_ddp(rows[1:]) == []


def test_communication_time_counts_overlapping_collectives_once(tmp_path):
    """benchmarks/scaling.py's split of a recorded step: collectives overlap (DDP's buckets on gloo's
    worker threads, ZeRO-3's prefetch) and may start before the step or end after it; the time any
    is in flight within the step counts once. The main thread's launch of an op is not a collective."""
    from scaling import step_split

    def span(name, start, length, tid=1):
        return {"ph": "X", "name": name, "ts": start, "dur": length, "tid": tid}

    events = [span("ProfilerStep#3", 1000, 1000), span("ProfilerStep#4", 2000, 500),
              span("gloo:all_reduce", 1100, 200, tid=7), span("gloo:all_reduce", 1200, 200, tid=8),  # 1100-1400
              span("gloo:all_gather", 1900, 300, tid=7),  # crosses into step 4: 100 us in 3, 200 in 4
              span("c10d::allreduce_", 1100, 5), span("aten::mm", 1500, 300),
              {"ph": "i", "name": "gloo:all_reduce", "ts": 1600}]  # an instant, not a span
    trace = tmp_path / "rank0.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    assert step_split(trace) == [{"step_s": 1e-3, "comm_s": 400e-6}, {"step_s": 5e-4, "comm_s": 200e-6}]


def test_the_scaling_section_is_replaced_not_appended(tmp_path):
    from report import write_scaling_section

    def row(strategy, processes, tokens_per_s):
        return {"shape": "tiny-opt", "strategy": strategy, "processes": processes, "tokens_per_s": tokens_per_s,
                "efficiency": tokens_per_s / 1000, "step_s": 1.0, "comm_s": 0.25, "compute_s": 0.75,
                "comm_share": 0.25, "comm_bytes_per_rank": 2.9e6}

    result = {"mode": "quick", "rows": [row("single", 1, 1000.0), row("ddp", 2, 1100.0)], "machine": "m",
              "seconds": 200, "command": "python benchmarks/scaling.py --quick"}
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# Benchmarks\n\nSpeed tables stay.\n")
    for _ in range(2):
        write_scaling_section(result, results_md)
    text = results_md.read_text()
    assert text.count("scaling:begin") == text.count("scaling:end") == 1 and "Speed tables stay." in text
    assert "| tiny-opt | ddp | 2 | 1100.0 | 1.10 | 1.00 | 0.25 | 25% | 2.9 |" in text
    assert (tmp_path / "scaling.png").stat().st_size > 1000


def test_each_config_is_benchmarked_on_the_processes_it_is_written_for():
    """hsdp's 2 x 2 mesh needs 4 processes (run.py's strategy table once launched it on 2 and failed)."""
    from run import config_processes

    assert config_processes("hsdp") == 4 and config_processes("zero3") == config_processes("ddp") == 2


LOCKSTEP_PROGRAM = """
import sys, time, torch
name, log = sys.argv[1], sys.argv[2]
weight = torch.nn.Parameter(torch.zeros(1))
optimizer = torch.optim.SGD([weight], lr=0.1)
def note(line):
    with open(log, "a") as f:
        f.write(line + "\\n")
for step in range(4):
    note(f"{name}{step}<")
    time.sleep(0.2)  # the step's work
    note(f"{name}{step}>")
    weight.grad = torch.ones(1)
    optimizer.step()
"""


def test_lockstep_programs_take_turns_step_by_step(tmp_path):
    """benchmarks/lockstep.py, which run.py wraps around the toolkit and its peers: after the first
    step and a rendezvous, the two programs alternate, and each step's seconds are its own work only."""
    import subprocess

    program, log = tmp_path / "train.py", tmp_path / "steps.log"
    program.write_text(LOCKSTEP_PROGRAM)
    procs = [subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "lockstep.py"), "--ring", str(tmp_path),
                               "--turn", str(turn), "--of", "2", "--steps", "4", "--", str(program), name, str(log)])
             for turn, name in enumerate("AB")]
    assert [proc.wait(timeout=120) for proc in procs] == [0, 0]
    lines = log.read_text().split()
    assert sorted(lines[:4]) == ["A0<", "A0>", "B0<", "B0>"]  # the first steps overlap (start-up)
    # then A goes first, and no step begins before the other program's has ended
    assert lines[4:] == [f"{name}{step}{end}" for step in (1, 2, 3) for name in "AB" for end in "<>"]
    for turn in (0, 1):
        seconds = json.loads((tmp_path / f"seconds-{turn}-rank0.json").read_text())
        # Each step sleeps 0.2 s; a step that also counted its partner's would take over 0.4 s.
        assert len(seconds) == 3 and all(0.2 <= s < 0.39 for s in seconds), seconds
