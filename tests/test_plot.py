"""python -m gptlab.plot: loss and lr curves from metrics.jsonl, runs overlaid."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT


def write_run(d, rows, tail=""):
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return d


def test_read_series_keeps_numbers_and_the_last_value_of_a_relogged_step(tmp_path):
    from gptlab.plot import read_series

    run = write_run(tmp_path / "run", [
        {"step": 1, "train/loss": 5.0, "train/lr": 1e-4},
        {"step": 2, "train/loss": 4.0, "train/lr": 2e-4},
        {"step": 2, "eval/loss": 4.5, "eval/perplexity": "inf"},
        {"step": 2, "sample/0": "def f(): pass"},
        {"step": 2, "train/loss": 3.5, "train/lr": 2e-4},  # resumed after step 1: supersedes
    ], tail='{"step": 3, "train/lo')  # a line cut short by a kill
    s = read_series(run)
    assert s["train/loss"] == [(1, 5.0), (2, 3.5)]
    assert s["eval/loss"] == [(2, 4.5)]
    assert "eval/perplexity" not in s and "sample/0" not in s


def test_plot_overlays_runs_into_a_png(tmp_path):
    a = write_run(tmp_path / "exp" / "2026-01-01_10-00-00",
                  [{"step": s, "train/loss": 6 - s / 10, "train/lr": 1e-3} for s in range(1, 21)]
                  + [{"step": 10, "eval/loss": 5.2}, {"step": 20, "eval/loss": 4.3}])
    b = write_run(tmp_path / "exp" / "2026-01-02_10-00-00",
                  [{"step": s, "train/loss": 6 - s / 5, "train/lr": 3e-4} for s in range(1, 11)])
    out = tmp_path / "out" / "both.png"
    proc = subprocess.run([sys.executable, "-m", "gptlab.plot", str(a), str(b), "-o", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000

    from gptlab.plot import label_for
    assert label_for(a, [a, b]) == "exp/2026-01-01_10-00-00"


def test_plot_a_real_run_next_to_itself(trained_run, tmp_path):
    from PIL import Image

    from gptlab.plot import main, read_series

    run_dir = trained_run[0]
    s = read_series(run_dir)
    assert [st for st, _ in s["train/loss"]] == list(range(5, 41, 5)) and len(s["eval/loss"]) == 2
    single = main([str(run_dir)])
    assert single == run_dir / "curves.png"
    assert Image.open(single).size == (1080, 840)


def test_a_directory_without_metrics_is_a_clear_error(tmp_path):
    from gptlab.plot import main

    with pytest.raises(FileNotFoundError, match="metrics.jsonl not found"):
        main([str(tmp_path)])
