"""Forward+backward speed of the model with each technique switched off, and each preset's size.

  python3 bench/model_speed.py                 # PRESET=smoke shapes on this machine
  BENCH_PRESET=pr585 python3 bench/model_speed.py

Rows run interleaved over BENCH_ROUNDS rounds so that drift of the machine hits them alike; the
table shows the median tokens/s. Not a test: numbers depend on the machine.
"""
from __future__ import annotations

import os
import statistics
import time

import torch
from common import load_module

ABLATIONS = {  # row -> env overrides of the preset (one technique off each)
    "all on": {},
    "BigramHash off": {"BIGRAM_BUCKETS": "0"},
    "SmearGate off": {"SMEAR": "0"},
    "XSA off": {"XSA_LAST_N": "0"},
    "partial RoPE off (all dims)": {"ROPE_DIMS": "0"},
    "value embeddings off": {"VE_DIM": "0"},
    "U-Net skips off": {"UNET": "0"},
    "gated attention on": {"ATTN_GATE": "1"},
    "value residual on": {"VALUE_RESIDUAL": "1"},
    "doc masking on": {"DOC_MASK": "1"},
}


def settings(tg, preset: str, overrides: dict[str, str]):
    names = [f.upper() for f in tg.Settings.__dataclass_fields__]
    saved = {k: os.environ.pop(k) for k in names if k in os.environ}
    os.environ.update(PRESET=preset, DEVICE="cpu", **overrides)
    try:
        return tg.Settings()
    finally:
        for k in ["PRESET", *overrides]:
            os.environ.pop(k, None)
        os.environ.update(saved)


def time_step(tg, h, batch: torch.Tensor, repeats: int) -> float:
    torch.manual_seed(0)
    model = tg.GPT(h)
    model.train()
    for _ in range(2):  # warm-up
        model(batch, batch).mean().backward()
    t0 = time.perf_counter()
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        model(batch, batch).mean().backward()
    return repeats * batch.numel() / (time.perf_counter() - t0)


def main() -> None:
    tg = load_module("train_gpt", "train_gpt.py")
    preset = os.environ.get("BENCH_PRESET", "smoke")
    rounds, repeats = int(os.environ.get("BENCH_ROUNDS", 3)), int(os.environ.get("BENCH_REPEATS", 3))
    base = settings(tg, preset, {})
    seqs = max(1, base.train_batch_tokens // base.train_seq_len // max(1, base.grad_accum_steps))
    batch = torch.randint(0, base.vocab_size, (seqs, base.train_seq_len))
    batch[:, :: max(1, base.train_seq_len // 4)] = tg.BOS_ID  # documents, for the masking row
    speeds: dict[str, list[float]] = {row: [] for row in ABLATIONS}
    for _ in range(rounds):
        for row, env in ABLATIONS.items():
            speeds[row].append(time_step(tg, settings(tg, preset, env), batch, repeats))
    print(f"preset:{preset} batch:{tuple(batch.shape)} threads:{torch.get_num_threads()} rounds:{rounds}")
    print("| row | params | fwd+bwd tokens/s (median) | vs all on |\n|---|---|---|---|")
    ref = statistics.median(speeds["all on"])
    for row, env in ABLATIONS.items():
        params = sum(p.numel() for p in tg.GPT(settings(tg, preset, env)).parameters())
        med = statistics.median(speeds[row])
        print(f"| {row} | {params:,} | {med:,.0f} | {med / ref - 1:+.1%} |")
    print("\n| preset | parameters |\n|---|---|")
    for name in tg.PRESETS:
        print(f"| {name} | {sum(p.numel() for p in tg.GPT(settings(tg, name, {})).parameters()):,} |")


if __name__ == "__main__":
    main()
