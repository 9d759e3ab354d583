"""Loss and learning-rate curves of one or more runs, as a PNG, from their metrics.jsonl.

    python -m gptlab.plot outputs/tolstoy_scratch/<a> outputs/tolstoy_scratch/<b> -o curves.png
"""
import argparse
import json
import math
from pathlib import Path


def read_series(run_dir) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} for every numeric metric, sorted by step.

    A step logged twice (a resumed run re-logging steps after its checkpoint) keeps the
    last value, so the curve shows what the finished run did.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a gptlab run directory?")
    by_key: dict[str, dict[int, float]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # the last line of a killed run may be cut short
            continue
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                by_key.setdefault(k, {})[int(row["step"])] = float(v)
    return {k: sorted(d.items()) for k, d in by_key.items()}


def label_for(run_dir: Path, all_dirs: list[Path]) -> str:
    """The shortest trailing path that tells the runs apart: usually <experiment>/<timestamp>."""
    parts = run_dir.resolve().parts
    for n in range(1, len(parts) + 1):
        tails = {d.resolve().parts[-n:] for d in all_dirs}
        if len(tails) == len(all_dirs):
            return "/".join(parts[-max(n, 2):])
    return str(run_dir)


def plot_runs(run_dirs, out: Path, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    run_dirs = [Path(d) for d in run_dirs]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, height_ratios=[2, 1])
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run_dir in enumerate(run_dirs):
        series, color, name = read_series(run_dir), colors[i % len(colors)], label_for(run_dir, run_dirs)
        if not series:
            raise ValueError(f"{run_dir}/metrics.jsonl holds no metrics")
        for key, style, what in (("train/loss", "-", "train"), ("eval/loss", "--o", "eval")):
            if key in series:
                steps, values = zip(*series[key])
                ax_loss.plot(steps, values, style, color=color, label=f"{name} {what}", markersize=3)
        if "train/lr" in series:
            steps, values = zip(*series["train/lr"])
            ax_lr.plot(steps, values, "-", color=color, label=name)
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(fontsize="small")
    ax_loss.set_title(title or "training curves")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(prog="python -m gptlab.plot", description=__doc__.splitlines()[0])
    ap.add_argument("run_dirs", nargs="+", help="run directories holding metrics.jsonl; overlaid")
    ap.add_argument("-o", "--output", help="PNG path; default RUN_DIR/curves.png for one run, "
                                           "curves.png here for several")
    ap.add_argument("--title")
    args = ap.parse_args(argv)
    out = args.output or (Path(args.run_dirs[0]) / "curves.png" if len(args.run_dirs) == 1 else "curves.png")
    path = plot_runs(args.run_dirs, out, args.title)
    print(path)
    return path


if __name__ == "__main__":
    main()
