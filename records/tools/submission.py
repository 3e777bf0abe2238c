"""Build a record submission from train_gpt.py logs: submission.json, a results table, and the
challenge's significance test (a mean improvement of at least 0.005 nats at p < 0.01, Welch's t-test
against a reference's per-seed scores).

  python3 records/tools/submission.py logs/s1.txt logs/s2.txt logs/s3.txt --name "My record" \\
      --author "Ada" --github-id ada --reference-bpb 1.1179,1.1183,1.1175 --out records/track_10min_16mb/my_run

Logs that are incomplete, repeat a seed or differ in anything but the seed are refused.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
from pathlib import Path

from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
from logs import LogError, RunLog, read_log  # noqa: E402

TRAIN_LIMIT_S = EVAL_LIMIT_S = 600.0
SIZE_LIMIT = 16_000_000
MIN_GAIN_NATS = 0.005
P_THRESHOLD = 0.01
PER_RUN_SETTINGS = {"seed", "run_id", "artifact_path", "checkpoint_path", "log_dir", "eval_dump", "resume"}


def check_consistent(runs: list[RunLog]) -> None:
    seeds = [r.seed for r in runs]
    if len(set(seeds)) != len(seeds):
        raise LogError(f"seeds repeat across the logs: {seeds}")
    first = runs[0]
    for run in runs[1:]:
        for key in sorted(set(first.settings) | set(run.settings)):
            if key not in PER_RUN_SETTINGS and first.settings.get(key) != run.settings.get(key):
                raise LogError(f"{run.path} differs from {first.path} in {key}: "
                               f"{run.settings.get(key)!r} vs {first.settings.get(key)!r}")
        if run.bytes_code != first.bytes_code:
            raise LogError(f"{run.path}: code size {run.bytes_code} differs from {first.bytes_code}; not the same script")
        if run.final_stage != first.final_stage:
            raise LogError(f"{run.path}: scored by {run.final_stage}, {first.path} by {first.final_stage}")


def welch_test(ours: list[float], reference: list[float], gain: float = MIN_GAIN_NATS) -> dict:
    """One-sided Welch test of mean(ours) < mean(reference) - gain (val_loss in nats)."""
    if len(ours) < 2 or len(reference) < 2:
        raise LogError("the significance test needs at least 2 seeds on each side")
    shifted = [r - gain for r in reference]
    result = stats.ttest_ind(ours, shifted, equal_var=False, alternative="less")
    va, vb = statistics.variance(ours) / len(ours), statistics.variance(reference) / len(reference)
    df = (va + vb) ** 2 / (va ** 2 / (len(ours) - 1) + vb ** 2 / (len(reference) - 1)) if va + vb else float("inf")
    delta = statistics.mean(reference) - statistics.mean(ours)
    p = float(result.pvalue)
    return dict(reference_val_loss=reference, delta_nats=delta, threshold_nats=gain, t_statistic=float(result.statistic),
                welch_df=df, p_value=p, significant=bool(delta >= gain and p < P_THRESHOLD))


def build(runs: list[RunLog], args: argparse.Namespace) -> dict:
    check_consistent(runs)
    losses, bpbs = [r.val_loss for r in runs], [r.val_bpb for r in runs]
    std = (lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0)
    hardware = args.hardware or f"{runs[0].world_size}x{runs[0].gpu}"
    sub = dict(
        author=args.author, github_id=args.github_id, name=args.name, date=args.date, blurb=args.blurb,
        track="10min_16mb", hardware=hardware, val_bpb=round(statistics.mean(bpbs), 8),
        val_loss=round(statistics.mean(losses), 8), val_bpb_std=round(std(bpbs), 8), val_loss_std=round(std(losses), 8),
        scored_by=runs[0].final_stage, bytes_total=max(r.bytes_total for r in runs), bytes_code=runs[0].bytes_code,
        seeds=[r.seed for r in runs],
        seed_results={str(r.seed): dict(val_loss=r.val_loss, val_bpb=r.val_bpb, artifact_bytes=r.bytes_total,
                                        steps=r.steps, train_seconds=r.train_seconds, eval_seconds=r.eval_seconds)
                      for r in runs},
        compliance=dict(
            train_under_600s=all(r.train_seconds <= TRAIN_LIMIT_S for r in runs),
            eval_under_600s=all(r.eval_seconds is not None and r.eval_seconds <= EVAL_LIMIT_S for r in runs),
            artifact_under_16mb=all(r.bytes_total <= SIZE_LIMIT for r in runs),
            score_first_ttt=all(r.ttt for r in runs) or None,  # train_gpt.py's TTT scores each chunk first
            causal_slot_only=any(r.slot for r in runs) or None,
            three_seeds=len(runs) >= 3,
        ),
    )
    reference = args.reference_loss
    if args.reference_bpb:  # same validation set: nats = bpb * ln 2 * bytes / tokens
        ratio = math.log(2) * runs[0].val_bytes / runs[0].val_tokens
        reference = [b * ratio for b in args.reference_bpb]
    if reference:
        sub["significance"] = welch_test(losses, reference)
    return sub


def results_table(sub: dict) -> str:
    rows = ["| seed | val_loss | val_bpb | artifact bytes | steps | train s | eval s |", "|---|---|---|---|---|---|---|"]
    for seed, r in sub["seed_results"].items():
        rows.append(f"| {seed} | {r['val_loss']:.8f} | {r['val_bpb']:.8f} | {r['artifact_bytes']:,} | {r['steps']} "
                    f"| {r['train_seconds']:.1f} | {r['eval_seconds'] if r['eval_seconds'] is not None else '-'} |")
    rows.append(f"| **mean ± std** | {sub['val_loss']:.8f} ± {sub['val_loss_std']:.8f} | "
                f"{sub['val_bpb']:.8f} ± {sub['val_bpb_std']:.8f} | max {sub['bytes_total']:,} | | | |")
    text = "\n".join(rows) + f"\n\nScored by: {sub['scored_by']}; hardware: {sub['hardware']}.\n"
    if "significance" in sub:
        s = sub["significance"]
        text += (f"\nWelch's t-test against the reference: Δ = {s['delta_nats']:.5f} nats (need ≥ {s['threshold_nats']}), "
                 f"t = {s['t_statistic']:.3f}, df = {s['welch_df']:.1f}, p = {s['p_value']:.3g} "
                 f"→ {'significant' if s['significant'] else 'NOT significant'} at p < {P_THRESHOLD}.\n")
    return text


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", nargs="+", help="logs/<RUN_ID>.txt of each seed")
    p.add_argument("--name", required=True)
    p.add_argument("--author", required=True)
    p.add_argument("--github-id", required=True)
    p.add_argument("--blurb", default="")
    p.add_argument("--date", default=datetime.date.today().isoformat())
    p.add_argument("--hardware", default="", help="default: from the logs, e.g. 8xH100")
    ref = p.add_mutually_exclusive_group()
    ref.add_argument("--reference-loss", type=_floats, help="the reference's per-seed val_loss (nats), comma-separated")
    ref.add_argument("--reference-bpb", type=_floats, help="the reference's per-seed val_bpb, comma-separated")
    p.add_argument("--out", default=".", help="folder for submission.json and results.md")
    p.add_argument("--script", default="", help="also copy this train_gpt.py and the logs into --out")
    args = p.parse_args(argv)
    try:
        sub = build([read_log(path) for path in args.logs], args)
    except (LogError, OSError) as e:
        sys.exit(f"error: {e}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.script:  # the record folder holds the very script that made the logs
        script = Path(args.script).read_bytes()
        if len(script) != sub["bytes_code"]:
            sys.exit(f"error: {args.script} is {len(script)} bytes but the logs' code is {sub['bytes_code']}; "
                     "it is not the script that made them")
        (out / "train_gpt.py").write_bytes(script)
        for path in args.logs:
            (out / Path(path).name).write_bytes(Path(path).read_bytes())
    (out / "submission.json").write_text(json.dumps(sub, indent=2) + "\n", encoding="utf-8")
    (out / "results.md").write_text(results_table(sub), encoding="utf-8")
    print(results_table(sub))
    return sub


if __name__ == "__main__":
    main()
