"""Plot train_gpt.py logs: train loss and validation bpb by step, and the bpb at each pipeline stage
(live weights, averaged, quantized, sliding window, TTT), for one log or several.

  python3 records/tools/plot.py logs/a.txt logs/b.txt -o curves.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from logs import STAGES, LogError, read_log  # noqa: E402


def plot(paths: list[str], out: str) -> None:
    runs = [read_log(p) for p in paths]
    fig, (train_ax, val_ax, stage_ax) = plt.subplots(1, 3, figsize=(16, 4.5))
    for run in runs:
        label = f"{run.path.stem} (seed {run.seed})"
        if run.train_curve:
            train_ax.plot(*zip(*run.train_curve), label=label, lw=1)
        if run.val_curve:
            val_ax.plot(*zip(*run.val_curve), marker="o", label=label)
    train_ax.set(title="train loss", xlabel="step", ylabel="nats/token")
    val_ax.set(title="validation (live weights)", xlabel="step", ylabel="val_bpb")
    stages = [s for s in STAGES if any(s in r.stages for r in runs)]
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        xs = [j + i * width for j, s in enumerate(stages) if s in run.stages]
        ys = [run.stages[s][1] for s in stages if s in run.stages]
        stage_ax.bar(xs, ys, width, label=run.path.stem)
        for x, y in zip(xs, ys):
            stage_ax.text(x, y, f"{y:.4f}", ha="center", va="bottom", fontsize=7, rotation=90)
    stage_ax.set_xticks([j + 0.4 - width / 2 for j in range(len(stages))], stages)
    lows = [v[1] for r in runs for v in r.stages.values()]
    stage_ax.set(title="val_bpb by stage", ylim=(min(lows) * 0.98, max(lows) * 1.02))
    for ax in (train_ax, val_ax, stage_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", nargs="+")
    p.add_argument("-o", "--out", default="curves.png")
    args = p.parse_args(argv)
    try:
        plot(args.logs, args.out)
    except (LogError, OSError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
