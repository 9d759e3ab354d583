"""Every published benchmark number can be traced: bench/RESULTS.md names each raw JSON file it
reads from, every file in bench/results/ is named there, each says the command that made it,
and every bench writes one by default."""
import json
import re

from conftest import ROOT

BENCH = ROOT / "bench"
LINK = re.compile(r"\(results/((?:gpu/)?[\w.-]+\.json)\)")  # GPU runs under results/gpu/


def test_results_md_and_bench_results_name_each_other():
    text = (BENCH / "RESULTS.md").read_text()
    linked = set(LINK.findall(text))
    stored = {p.relative_to(BENCH / "results").as_posix() for p in (BENCH / "results").rglob("*.json")}
    assert linked - stored == set(), "RESULTS.md links JSON files that are not committed"
    assert stored - linked == set(), "bench/results/ holds JSON files that no table in RESULTS.md names"


def test_every_raw_result_says_the_command_that_made_it():
    for path in (BENCH / "results").rglob("*.json"):
        command = json.loads(path.read_text())["command"]
        script = command.split()[1]
        assert command.split()[0] in ("python", "bash") and script.startswith("bench/") and (ROOT / script).is_file(), \
            (path.name, command)


def test_every_bench_writes_its_raw_results_by_default():
    scripts = [p for p in BENCH.glob("*.py") if p.name != "common.py"]
    assert len(scripts) >= 10
    for script in scripts:
        source = script.read_text()
        # host_reads.py merges a before and an after run into one file, under --label.
        assert any(f'add_json_option({p}, "{d}{script.stem}")' in source for p in ("p", "ap") for d in ("", "gpu/")) \
            or script.name == "host_reads.py", script.name
