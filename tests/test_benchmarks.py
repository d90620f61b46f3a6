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
            "formula_gb": 0.93, "start_peak_gb": [1.51, 1.52], "training_peak_gb": [1.96, 1.97]}
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
    assert "| zero3 | random-opt-125m | yes | 125M | 0.93 | 1.51, 1.52 | 1.96, 1.97 | 70 |" in text
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
