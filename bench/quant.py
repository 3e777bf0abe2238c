"""What each export choice costs in bpb and bytes, on one model trained with PRESET=smoke.

  python3 bench/quant.py                       # ~10 minutes on 2 CPU cores
  BENCH_VAL_TOKENS=0 python3 bench/quant.py    # score on the whole bundled val sample (slower)

Trains once (PRESET=smoke, EMA applied as in a run), calibrates once (self-generated tokens, and
training batches for comparison), then for int4/int5/int6 block matrices (embeddings int8):
round-to-nearest vs GPTQ under each clip rule, scored by the non-overlapping val bpb of the
dequantized model; then the bytes of one export under every compressor. Each row has its seconds.
Not a test: numbers depend on the machine; the README quotes a run and its command.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import time

import torch
from common import load_module


def variant(h, **changes):
    """A copy of the settings with some fields changed (no env vars re-read)."""
    out = copy.copy(h)
    for key, value in changes.items():
        setattr(out, key, value)
    return out


def train(tg, h, rt, val):
    model = tg.build_model(h, rt)
    trainer = tg.Trainer(h, rt, model, val)
    trainer.warmup()
    steps, train_ms = trainer.run()
    tg.set_qat(model, False)
    trainer.averager.apply_final()
    return model, trainer, steps, train_ms


def score(tg, h, rt, val, state) -> float:
    model = tg.build_model(h, rt)
    model.load_state_dict(state)
    return tg.evaluate(h, rt, model, val)[1]


def main() -> None:
    tg = load_module("train_gpt", "train_gpt.py")
    os.environ.setdefault("PRESET", "smoke")
    h = tg.Settings()
    rt = tg.init_runtime(h)
    torch.manual_seed(h.seed)
    val = tg.load_val_data(h, tg.load_tokenizer(h))
    cut = int(os.environ.get("BENCH_VAL_TOKENS", 131072))
    if cut:
        val = dataclasses.replace(val, tokens=val.tokens[:cut + 1],  # the byte sidecar (CaseOps) is cut alike
                                  sidecar=None if val.sidecar is None else val.sidecar[:cut + 1])
    t0 = time.perf_counter()
    model, trainer, steps, train_ms = train(tg, h, rt, val)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    print(f"preset:{h.preset} steps:{steps} train_s:{train_ms / 1000:.1f} total_s:{time.perf_counter() - t0:.1f} "
          f"val_tokens:{val.tokens.numel() - 1} threads:{torch.get_num_threads()}", flush=True)
    float_bpb = score(tg, h, rt, val, state)

    names = tg.export_bits(variant(h, quant_bits_mlp=4, quant_bits_attn=4), state)
    t0 = time.perf_counter()
    tokens = tg.generate_calibration(h, rt, model)
    sums, count = tg.collect_hessians(rt, model, tokens.split(8), names)
    selfgen = {k: v / count for k, v in sums.items()}
    selfgen_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    batches = [trainer.loader.next_batch()[0] for _ in range(max(1, h.calib_seqs * h.train_seq_len
                                                              // h.train_batch_tokens))]
    sums, count = tg.collect_hessians(rt, model, batches, names)
    train_h = {k: v / count for k, v in sums.items()}
    train_s = time.perf_counter() - t0
    print(f"calibration selfgen:{h.calib_seqs}x{h.calib_len} {selfgen_s:.1f}s train:{count} tokens {train_s:.1f}s",
          flush=True)

    print("\n| bits | method | clip | calibration | val bpb | Δ vs float | rel. Hessian error | quantize s | eval s |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| float | – | – | – | {float_bpb:.4f} | – | – | – | – |", flush=True)
    rows = [(bits, method, clip, "selfgen") for bits in (4, 5, 6) for method in ("rtn", "gptq")
            for clip in ("absmax", "pct", "std", "auto")] + [(5, "gptq", "auto", "train")]
    for bits, method, clip, calib in rows:
        hv = variant(h, quant_bits_mlp=bits, quant_bits_attn=bits, quant_method=method, quant_clip_mlp=clip,
                     quant_clip_attn=clip, quant_clip_embed=clip)
        t0 = time.perf_counter()
        q = tg.quantize_model(hv, state, selfgen if calib == "selfgen" else train_h)
        quant_s = time.perf_counter() - t0
        deq = {**state, **{n: (c.float() * q.scales[n].float()[:, None]).to(state[n].dtype)
                           for n, c in q.codes.items()}}
        herr = sum(s["herr"] for s in q.stats.values()) / sum(s["hnorm"] for s in q.stats.values())
        t0 = time.perf_counter()
        bpb = score(tg, hv, rt, val, deq)
        print(f"| {bits} | {method} | {clip} | {calib if method == 'gptq' else '–'} | {bpb:.4f} | "
              f"{bpb - float_bpb:+.4f} | {herr:.3e} | {quant_s:.1f} | {time.perf_counter() - t0:.1f} |", flush=True)

    print("\n| bits | compressor | model bytes | compress s | vs hybrid |\n|---|---|---|---|---|")
    for bits in (4, 5, 6):
        hv = variant(h, quant_bits_mlp=bits, quant_bits_attn=bits, target_bytes=-1)
        q = tg.quantize_model(hv, state, selfgen)
        sizes = {}
        for compressor in ("zstd", "lzma", "brotli", "rans", "hybrid"):
            t0 = time.perf_counter()
            blob = tg.pack_artifact(q, tg.encode_all(variant(hv, compressor=compressor), q))
            sizes[compressor] = (len(blob), time.perf_counter() - t0)
        for compressor, (size, seconds) in sizes.items():
            print(f"| {bits} | {compressor} | {size:,} | {seconds:.1f} | {size / sizes['hybrid'][0] - 1:+.2%} |",
                  flush=True)


if __name__ == "__main__":
    main()
