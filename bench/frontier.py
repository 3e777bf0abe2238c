"""The frontier model against the default one at CPU size, on the bundled CaseOps sample.

  python3 bench/frontier.py                         # speed, FLOPs, then 3 seeds x 200 steps of each row
  BENCH_STEPS=100 BENCH_SEEDS=2 python3 bench/frontier.py
  BENCH_SEEDS=0 python3 bench/frontier.py           # speed and FLOPs only (BENCH_ROUNDS=0: fixed steps only)

1. Speed: median tokens/s of whole training steps (forward, backward, optimizers) of each row on this
   machine, the frontier both before and after its looping switch, interleaved over BENCH_ROUNDS rounds.
2. FLOPs per token (forward, analytic) of each row at smoke size and of the full-size presets.
3. Fixed steps: each row trained BENCH_STEPS steps with no wall-clock cap (each recipe's own schedule
   over those steps), the pre-export val_bpb of the last step on the sample's val cut to BENCH_VAL_TOKENS
   at a document boundary, mean and std over BENCH_SEEDS seeds (the seed-to-seed noise).
Not a test: numbers depend on the machine, and at CPU size nothing here says what helps on 8xH100.
"""
from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import ROOT, load_module, make_data

SAMPLE = ROOT / "data" / "sample" / "fineweb_sp8192_caseops"
ROWS = {"smoke (defaults)": "caseops,smoke", "frontier,smoke": "frontier,smoke"}
FINAL = re.compile(r"^step:(\d+)/(\d+) val_loss:([\d.]+) val_bpb:([\d.]+)", re.M)


def settings(tg, preset: str, **overrides):
    names = [f.upper() for f in tg.Settings.__dataclass_fields__]
    saved = {k: os.environ.pop(k) for k in names if k in os.environ}
    os.environ.update(PRESET=preset, DEVICE="cpu", **{k.upper(): str(v) for k, v in overrides.items()})
    try:
        return tg.Settings()
    finally:
        for k in ["PRESET", *(k.upper() for k in overrides)]:
            os.environ.pop(k, None)
        os.environ.update(saved)


def step_speed(tg, h, looping: bool, steps: int) -> float:
    """Tokens/s of Trainer.step on the sample (the warm-up flag keeps the looping state as set)."""
    import torch
    torch.manual_seed(0)
    rt = tg.Runtime()
    trainer = tg.Trainer(h, rt, tg.GPT(h), val=None)
    trainer.model.looping = looping
    trainer.step(0, 0.0, warm=True)
    t0 = time.perf_counter()
    for s in range(steps):
        trainer.step(s, 0.0, warm=True)
    return steps * h.train_batch_tokens / (time.perf_counter() - t0)


def fixed_steps(preset: str, seed: int, steps: int, data: Path, logs: Path) -> float:
    """The last step's val_bpb of one run, stopped once it is logged (export and final eval are not needed)."""
    env = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME", "LANG")}
    env.update(PATH=os.environ["PATH"], PRESET=preset, SEED=str(seed), ITERATIONS=str(steps), DATA_PATH=str(data),
               MAX_WALLCLOCK_SECONDS="0", VAL_LOSS_EVERY="0", LOG_DIR=str(logs), RUN_ID=f"{preset}-{seed}".replace(",", "_"),
               DEVICE="cpu", TRAIN_LOG_EVERY="50")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_gpt.py")], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        m = FINAL.match(line)
        if m and m.group(1) == m.group(2):
            proc.kill()
            return float(m.group(4))
    proc.wait()
    raise RuntimeError(f"{preset} seed {seed}: no final val line (exit {proc.returncode})")


def main() -> None:
    tg = load_module("train_gpt", "train_gpt.py")
    make_shards = load_module("make_shards", "data/make_shards.py")
    rounds, speed_steps = int(os.environ.get("BENCH_ROUNDS", 3)), int(os.environ.get("BENCH_SPEED_STEPS", 3))
    steps, seeds = int(os.environ.get("BENCH_STEPS", 200)), int(os.environ.get("BENCH_SEEDS", 3))
    val_tokens = int(os.environ.get("BENCH_VAL_TOKENS", 65536))
    import torch
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        cut = make_data(tg, make_shards, SAMPLE, 8192, data, val_tokens)
        speed_rows = {"smoke (defaults)": ("caseops,smoke", False), "frontier,smoke before looping": ("frontier,smoke", False),
                      "frontier,smoke looping": ("frontier,smoke", True)}
        speeds: dict[str, list[float]] = {row: [] for row in speed_rows}
        for _ in range(rounds):
            for row, (preset, looping) in speed_rows.items():
                speeds[row].append(step_speed(tg, settings(tg, preset, data_path=data), looping, speed_steps))
        h = settings(tg, "caseops,smoke", data_path=data)
        if rounds:
            speed_table(tg, speeds, speed_rows, data, h, rounds)
        flops_table(tg, data)
        if seeds:
            fixed_table(steps, seeds, cut, data, Path(tmp) / "logs")


def speed_table(tg, speeds, speed_rows, data, h, rounds) -> None:
    print(f"\n### Training speed (batch {h.train_batch_tokens} tokens x {h.train_seq_len}, {rounds} rounds)\n")
    print("| row | params | tokens/s (median) | vs defaults |\n|---|---|---|---|")
    ref = statistics.median(speeds["smoke (defaults)"])
    for row, (preset, _) in speed_rows.items():
        n = sum(p.numel() for p in tg.GPT(settings(tg, preset, data_path=data)).parameters())
        med = statistics.median(speeds[row])
        print(f"| {row} | {n:,} | {med:,.0f} | {med / ref - 1:+.1%} |")


def flops_table(tg, data) -> None:
    import torch
    print("\n### Forward FLOPs per token (analytic, `forward_flops`, at TRAIN_SEQ_LEN)\n")
    print("| preset | params | not looping | looping |\n|---|---|---|---|")
    for preset in ("caseops,smoke", "frontier,smoke", "caseops", "frontier"):
        h = settings(tg, preset, data_path=data)
        with torch.device("meta"):  # shapes only
            model = tg.GPT(h)
        flops = [tg.forward_flops(h, model, h.train_seq_len, looping=loop) for loop in (False, True)]
        loop = f"{flops[1]:.4g}" if h.num_loops else "-"
        print(f"| {preset} | {sum(p.numel() for p in model.parameters()):,} | {flops[0]:.4g} | {loop} |")


def fixed_table(steps, seeds, cut, data, logs) -> None:
    print(f"\n### Fixed steps: {steps} steps, val_bpb before export on {cut:,} val tokens, seeds 1337..\n")
    results: dict[str, list[float]] = {row: [] for row in ROWS}
    for seed in range(1337, 1337 + seeds):
        for row, preset in ROWS.items():
            results[row].append(fixed_steps(preset, seed, steps, data, logs))
            print(f"  {row} seed {seed}: {results[row][-1]:.4f}", flush=True)
    print("\n| row | val_bpb per seed | mean | std |\n|---|---|---|---|")
    for row, values in results.items():
        std = statistics.stdev(values) if len(values) > 1 else float("nan")
        print(f"| {row} | {', '.join(f'{v:.4f}' for v in values)} | {np.mean(values):.4f} | {std:.4f} |")


if __name__ == "__main__":
    main()
