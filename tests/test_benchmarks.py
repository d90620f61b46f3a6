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
