"""The whole pipeline on a CPU, one row per recipe: training for BENCH_SECONDS on the bundled sample,
EMA/SWA, quantization, compression, and the evaluation passes, with bpb at every stage side by side.

  python3 bench/pipeline.py                                    # every row, 60 s each, seed 1337
  BENCH_ROWS=baseline,full BENCH_SECONDS=30 python3 bench/pipeline.py
  BENCH_SEEDS=3 python3 bench/pipeline.py                      # mean ± std over seeds 1337, 1338, 1339

Env: BENCH_ROWS (comma list, default all), BENCH_SECONDS (training seconds per row, 60), BENCH_SEEDS (1),
BENCH_VAL_TOKENS (val cut, 65536), BENCH_OUT (bench/results: pipeline.csv, pipeline.md, logs/),
BENCH_RENDER (1: only rewrite pipeline.md from BENCH_OUT's csv, e.g. after changing the table code).
Each row is one `train_gpt.py` subprocess with its preset, scaled to the CPU by one rule for every row
(scaled_env); rows run interleaved (for each seed, every row) so that drift of the machine hits them alike.
Validation is the sample's val cut to its first BENCH_VAL_TOKENS tokens, at a document boundary.
Not a test: numbers depend on the machine, and a CPU-sized model ranks techniques only roughly.
"""
from __future__ import annotations

import csv
import dataclasses
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, load_module, make_data

SAMPLE = ROOT / "data" / "sample" / "fineweb_sp1024"
TOKENIZER = ROOT / "data" / "tokenizers" / "fineweb_1024_bpe.model"
STAGES = ("live", "averaged", "quantized", "sliding", "ttt")
PRESET_ROWS = {"baseline": "baseline", "full": "", "pr585": "pr585", "pr1683": "pr1683", "pr592": "pr592",
               "pr578": "pr578", "pr1319": "pr1319"}
ABLATIONS = {  # row -> (what is off, env overrides of the full recipe, a Settings field it needs or "")
    "no-bigram": ("BigramHash", {"BIGRAM_BUCKETS": "0"}, ""),
    "no-smear": ("SmearGate", {"SMEAR": "0"}, ""),
    "no-xsa": ("XSA", {"XSA_LAST_N": "0"}, ""),
    "no-partial-rope": ("partial RoPE", {"ROPE_DIMS": "0"}, ""),
    "no-ve": ("value embeddings", {"VE_DIM": "0"}, ""),
    "no-unet": ("U-Net skips", {"UNET": "0"}, ""),
    "no-ln-scale": ("LN scale", {"LN_SCALE": "0"}, ""),
    "no-ortho": ("ortho init", {"ORTHO_INIT": "0"}, ""),
    "no-ema-swa": ("EMA+SWA", {"EMA_DECAY": "0", "SWA_EVERY": "0", "FINAL_WEIGHTS": "live"}, ""),
    "no-qat": ("QAT", {"QAT_THRESHOLD": "0", "QAT_START_FRAC": "0"}, ""),
    "no-gptq": ("GPTQ", {"QUANT_METHOD": "rtn"}, "quant_method"),
    "no-sliding": ("sliding window", {"EVAL_STRIDE": "0"}, ""),
    "no-ttt": ("TTT", {"TTT_EPOCHS": "0"}, ""),
}
# Ablations that leave training as full's: their technique is judged inside the runs, on the stage it
# changes (stage after minus stage before), not on the final score, which carries the runs' training noise.
# (ablation row, stage before, stage after): GPTQ's quantization gap is compared with round-to-nearest's.
WITHIN_RUN = {"no-ema-swa": ("live", "averaged"), "no-gptq": ("averaged", "quantized"),
              "no-sliding": ("quantized", "sliding"), "no-ttt": ("sliding", "ttt")}
PROPORTIONAL = ("bigram_buckets", "bigram_dim", "ve_dim", "warmdown_iters", "muon_momentum_warmup_steps",
                "swa_every", "calib_seqs", "calib_len")
EVAL_STRIDE, TTT_CHUNK_DIVISOR, TTT_EPOCHS_DIVISOR, TTT_BATCH_SEQS, SLOT_STEPS_DIVISOR = 64, 8, 3, 8, 8
RULE = f"""The CPU scale, one rule for every row on top of its preset (scaled_env in bench/pipeline.py):
- shape and schedule of PRESET=smoke for all: width, heads, depth, sequence length, batch, no compile;
- {', '.join(PROPORTIONAL)}: the preset's value times smoke's ratio to our defaults;
- KV heads keep the preset's heads ratio (GQA vs MHA), XSA its fraction of the layers, partial RoPE its
  fraction of the head dim; the EMA horizon 1/(1-decay) shrinks as smoke's does; QUANT_MIN_NUMEL as smoke;
- eval: stride {EVAL_STRIDE} wherever the preset slides, TTT chunks /{TTT_CHUNK_DIVISOR} at the eval length with \
{TTT_BATCH_SEQS} sequences per step, TTT epochs /{TTT_EPOCHS_DIVISOR} (at least 1), SLOT steps /{SLOT_STEPS_DIVISOR}."""


def settings(tg, preset: str):
    """The preset's Settings as a run would build them, from an environment without any setting."""
    names = [f.upper() for f in tg.Settings.__dataclass_fields__]
    saved = {k: os.environ.pop(k) for k in names if k in os.environ}
    os.environ["PRESET"] = preset
    try:
        return tg.Settings()
    finally:
        os.environ.pop("PRESET")
        os.environ.update(saved)


def scaled_env(tg, preset: str, seconds: float) -> dict[str, str]:
    """One rule for every row: smoke's shape and schedule, the preset's techniques at smoke's proportions."""
    d, s, p = settings(tg, ""), settings(tg, "smoke"), settings(tg, preset)
    fields = tg.Settings.__dataclass_fields__
    env = {k: getattr(s, k) for k in ("model_dim", "num_heads", "num_layers", "train_seq_len", "eval_seq_len",
                                      "train_batch_tokens", "eval_batch_tokens", "grad_accum_steps",
                                      "warmup_steps", "train_log_every", "val_loss_every")}
    env.update(device="cpu", compile=False, iterations=10**6, max_wallclock_seconds=seconds, eval_max_seconds=0)
    for k in PROPORTIONAL:  # what smoke shrinks: the preset's value times smoke's ratio to our defaults
        if k in fields:
            env[k] = max(1, round(getattr(p, k) * getattr(s, k) / getattr(d, k))) if getattr(p, k) else 0
    env["num_kv_heads"] = max(1, s.num_heads * p.num_kv_heads // p.num_heads)  # GQA vs MHA survives
    env["xsa_last_n"] = max(1, round(p.xsa_last_n * s.num_layers / p.num_layers)) if p.xsa_last_n else 0
    head, p_head = s.model_dim // s.num_heads, p.model_dim // p.num_heads
    env["rope_dims"] = max(2, 2 * round(p.rope_dims * head / p_head / 2)) if p.rope_dims else 0
    # EMA: its horizon 1/(1-decay) shrinks as smoke's does (0.997 -> 0.95 at our defaults)
    env["ema_decay"] = round(1 - (1 - p.ema_decay) * (1 - s.ema_decay) / (1 - d.ema_decay), 4) if p.ema_decay else 0
    env["eval_stride"] = EVAL_STRIDE if 0 < p.eval_stride < p.eval_seq_len else 0
    env["ttt_epochs"] = max(1, round(p.ttt_epochs / TTT_EPOCHS_DIVISOR)) if p.ttt_epochs else 0
    env.update(ttt_seq_len=s.eval_seq_len, ttt_batch_seqs=TTT_BATCH_SEQS,
               ttt_chunk_tokens=max(s.eval_seq_len, p.ttt_chunk_tokens // TTT_CHUNK_DIVISOR))
    env["slot_steps"] = max(1, p.slot_steps // SLOT_STEPS_DIVISOR) if p.slot_steps else 0
    if "eval_passes" in fields:  # every stage scored within the run, for the ablations judged inside it
        env["eval_passes"] = "plain,sliding" if env["eval_stride"] else "plain"
    if "quant_min_numel" in fields:  # smoke's, else matrix area scaled with width squared
        env["quant_min_numel"] = (s.quant_min_numel if s.quant_min_numel != d.quant_min_numel
                                  else round(d.quant_min_numel * (s.model_dim / d.model_dim) ** 2))
    if "gptq_reserve_seconds" in fields and p.gptq_reserve_seconds:
        env["gptq_reserve_seconds"] = p.gptq_reserve_seconds * seconds / d.max_wallclock_seconds
    out = {"PRESET": preset}
    out.update({k.upper(): str(int(v) if isinstance(v, bool) else v) for k, v in env.items()})
    return out


def all_rows(tg) -> dict[str, tuple[str, dict[str, str], str]]:
    """row -> (preset, env overrides, what is off); ablations needing a setting this script lacks are left out."""
    rows = {name: (preset, {}, "") for name, preset in PRESET_ROWS.items()}
    fields = tg.Settings.__dataclass_fields__
    rows.update({name: ("", env, what) for name, (what, env, need) in ABLATIONS.items() if not need or need in fields})
    return rows


def env_number(name: str, default: str, kind=float, minimum: float = 1):
    raw = os.environ.get(name, default)
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not minimum <= value < float("inf"):
        sys.exit(f"error: {name}={raw!r} must be {'an integer' if kind is int else 'a number'} >= {minimum}")
    return value


def run_row(logs_mod, name: str, env: dict[str, str], logs: Path) -> dict:
    """One train_gpt.py subprocess; its log parsed into one CSV record (status 'failed: ...' on error)."""
    log_path, artifact = logs / f"{env['RUN_ID']}.txt", Path(env["ARTIFACT_PATH"])
    for stale in (log_path, logs / f"{env['RUN_ID']}.out"):
        stale.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], env=env, cwd=Path(env["DATA_PATH"]).parent,
                          capture_output=True, text=True)
    rec = {"row": name, "seed": env["SEED"], "wall_s": round(time.perf_counter() - t0, 1)}
    artifact.unlink(missing_ok=True)  # only its size matters, and the log has it
    if proc.returncode != 0:
        (logs / f"{env['RUN_ID']}.out").write_text(proc.stdout + proc.stderr)
        last = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        return {**rec, "status": f"failed (exit {proc.returncode}): {last[:160]}"}
    try:
        run = logs_mod.read_log(log_path)
    except (OSError, logs_mod.LogError) as e:
        return {**rec, "status": f"failed: {e}"}
    text = log_path.read_text(errors="replace")
    times = dict(re.findall(r"(\w+):([\d.]+)s", (re.findall(r"^artifact_time: (.*)$", text, re.M) or [""])[-1]))
    rec.update(status="ok", steps=run.steps, tok_s=round(run.steps * int(env["TRAIN_BATCH_TOKENS"])
                                                              / max(run.train_seconds, 1e-9)),
               **{s: run.stages[s][1] for s in STAGES if s in run.stages}, final=run.val_bpb,
               final_stage=run.final_stage, bytes_total=run.bytes_total, bytes_model=run.bytes_model,
               train_s=run.train_seconds, quant_s=times.get("total", ""), eval_s=run.eval_seconds or "")
    return rec


def cell(values: list[float], digits: int, sign: bool = False) -> str:
    if not values:
        return ""
    mean = f"{statistics.fmean(values):{'+' if sign else ''},.{digits}f}"
    return f"{mean} ± {statistics.stdev(values):,.{digits}f}" if len(values) > 1 else mean


def stage_gain(run: dict, before: str, after: str) -> float | None:
    """bpb of stage `after` minus stage `before` in one run (negative: the stage helped)."""
    if run.get(before, "") == "" or run.get(after, "") == "":
        return None
    return float(run[after]) - float(run[before])


def table(records: list[dict], rows: dict, order: list[str]) -> tuple[str, str]:
    """The markdown table (mean ± std over seeds) and the verdict lines under it."""
    ok = {name: [r for r in records if r["row"] == name and r["status"] == "ok"] for name in rows}
    full = {r["seed"]: r for r in ok.get("full", [])}
    # Noise: rows whose training is full's differ only by the run (wall-clock steps); their live bpb spread.
    same = [float(r["live"]) for name in ("full", *WITHIN_RUN) if name in order for r in ok[name] if r.get("live")]
    noise = max(same) - min(same) if len(same) > 1 else None
    head = ["row", "steps", "tok/s", *(f"{s} bpb" for s in STAGES), "final bpb", "Δ final vs full",
            "model bytes", "train s", "quant s", "eval s", "wall s", "note"]
    lines, hurt = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)], []
    for name in order:
        runs, note = ok[name], []
        failed = [r for r in records if r["row"] == name and r["status"] != "ok"]
        if failed:
            note.append(f"{len(failed)} run(s) {failed[-1]['status']}")
        num = lambda key: [float(r[key]) for r in runs if r.get(key, "") != ""]  # noqa: E731
        delta = [float(r["final"]) - float(full[r["seed"]]["final"]) for r in runs if r["seed"] in full] \
            if name != "full" else []
        what = rows[name][2]
        if name in WITHIN_RUN:  # the stage's own effect: in full's runs, or GPTQ's gap against this row's
            before, after = WITHIN_RUN[name]
            on = [g for r in full.values() if (g := stage_gain(r, before, after)) is not None]
            off = [g for r in runs if (g := stage_gain(r, before, after)) is not None] if name == "no-gptq" else [0.0]
            if on and off:
                effect = statistics.fmean(on) - statistics.fmean(off)
                note.append(f"{what} within the runs: {effect:+.4f} bpb ({after} − {before})")
                if effect > 0:
                    note.append(f"worse at this scale: {what} hurts")
                    hurt.append(name)
        elif what and delta and statistics.fmean(delta) < 0:
            within = noise is not None and -statistics.fmean(delta) <= noise
            note.append(f"worse at this scale: {what} hurts (off is {-statistics.fmean(delta):.4f} bpb better"
                        + (", within the noise)" if within else ")"))
            hurt.append(name + (" (within noise)" if within else ""))
        stage_names = sorted({r["final_stage"] for r in runs})
        cells = [name, cell(num("steps"), 0), cell(num("tok_s"), 0), *(cell(num(s), 4) for s in STAGES),
                 cell(num("final"), 4) + (f" ({'/'.join(stage_names)})" if stage_names else ""),
                 cell(delta, 4, sign=True), cell(num("bytes_model"), 0), cell(num("train_s"), 1),
                 cell(num("quant_s"), 1), cell(num("eval_s"), 1), cell(num("wall_s"), 1), "; ".join(note)]
        lines.append("| " + " | ".join(cells) + " |")
    base = [float(r["final"]) - float(full[r["seed"]]["final"]) for r in ok.get("baseline", []) if r["seed"] in full]
    if not base:
        verdict = "full vs baseline: not compared (both rows must finish on the same seeds)."
    else:
        gap = statistics.fmean(base)
        verdict = (f"full {'beat' if gap > 0 else 'did NOT beat'} baseline on final bpb by {gap:+.4f} "
                   f"(baseline minus full, mean over {len(base)} seed(s)).")
    if noise is not None:
        twins = [n for n in ("full", *WITHIN_RUN) if n in order]
        verdict += (f"\n\nRun-to-run noise: the runs trained exactly as full ({', '.join(twins)}; every seed) differ "
                    f"in live bpb by up to {noise:.4f} (wall-clock steps vary); a Δ final smaller than that is within "
                    "the noise." + (f" {', '.join(twins[1:])} are judged within the runs instead." if twins[1:] else ""))
    verdict += f"\n\nTurning off made it better at this scale: {', '.join(hurt) or 'no ablation'}."
    return "\n".join(lines), verdict


def machine() -> str:
    cpu = platform.processor()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    torch = sys.modules.get("torch")
    return (f"{cpu or platform.machine()}, {os.cpu_count()} cores, {platform.system()}, "
            f"python {platform.python_version()}, torch {getattr(torch, '__version__', '?')}")


def header(tg, seconds: float, seeds: int, cut: int) -> str:
    command = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(os.environ.items()) if k.startswith("BENCH_"))
    layers = scaled_env(tg, "", seconds)["NUM_LAYERS"]
    return (f"# Pipeline benchmark\n\n`{(command + ' ').lstrip()}python3 bench/pipeline.py` on "
            f"{time.strftime('%Y-%m-%d %H:%M')}; {machine()}.\n\n"
            f"{seconds:g} s of training per row, seed{'s' if seeds > 1 else ''} "
            f"{', '.join(str(1337 + i) for i in range(seeds))}{' (mean ± std)' if seeds > 1 else ''}; data: the "
            f"bundled sample's train shards, and its val cut to the first {cut:,} tokens (at a document "
            f"boundary), so scores are not comparable with full-val ones. Rows: full = our defaults, baseline "
            f"and prNNN = PRESET=name, no-X = full with one technique off. Depth is normalized: {layers} layers "
            f"in every row. Bytes: the compressed model, without the code.\n\n{RULE}")


def write_results(out: Path, records: list[dict], rows: dict, order: list[str], header: str) -> None:
    keys = ["row", "seed", "status", "steps", "tok_s", *STAGES, "final", "final_stage", "bytes_total",
            "bytes_model", "train_s", "quant_s", "eval_s", "wall_s"]
    with open(out / "pipeline.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, restval="")
        writer.writeheader()
        writer.writerows(records)
    (out / "pipeline_header.md").write_text(header)
    body, verdict = table(records, rows, order)
    (out / "pipeline.md").write_text(f"{header}\n\n{body}\n\n{verdict}\n")


def render(out: Path, rows: dict) -> None:
    """BENCH_RENDER=1: pipeline.md again from BENCH_OUT's pipeline.csv and header, without running."""
    try:
        with open(out / "pipeline.csv", newline="") as f:
            records = list(csv.DictReader(f))
        header = (out / "pipeline_header.md").read_text()
    except OSError as e:
        sys.exit(f"error: BENCH_RENDER=1 needs a finished bench in BENCH_OUT={out} ({e.strerror}: {e.filename})")
    order = list(dict.fromkeys(r["row"] for r in records))
    body, verdict = table(records, rows, [name for name in order if name in rows])
    (out / "pipeline.md").write_text(f"{header}\n\n{body}\n\n{verdict}\n")
    print(f"{body}\n\n{verdict}\nwritten: {out / 'pipeline.md'}")


def main() -> None:
    tg = load_module("train_gpt", "train_gpt.py")
    make_shards = load_module("make_shards", "data/make_shards.py")
    logs_mod = load_module("logs", "records/tools/logs.py")
    rows = all_rows(tg)
    out = Path(os.environ.get("BENCH_OUT", ROOT / "bench" / "results")).resolve()
    if os.environ.get("BENCH_RENDER", "0") == "1":
        return render(out, rows)
    order = [r.strip() for r in os.environ.get("BENCH_ROWS", ",".join(rows)).split(",") if r.strip()]
    unknown = [r for r in order if r not in rows] or ([] if order else ["(none given)"])
    if unknown:
        sys.exit(f"error: BENCH_ROWS={os.environ.get('BENCH_ROWS')!r}: unknown row(s) {', '.join(unknown)}; "
                 f"choose from: {', '.join(rows)}")
    seconds = env_number("BENCH_SECONDS", "60", float, 1)
    seeds = env_number("BENCH_SEEDS", "1", int, 1)
    val_tokens = env_number("BENCH_VAL_TOKENS", "65536", int, 4096)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    ours = {f.name.upper() for f in dataclasses.fields(tg.Settings)}
    ignored = sorted(k for k in os.environ if k in ours)
    if ignored:
        print(f"note: ignoring {', '.join(ignored)} from the environment; each row sets its own settings")
    base_env = {k: v for k, v in os.environ.items() if k not in ours and not k.startswith("BENCH_")}

    records: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
        cut = make_data(tg, make_shards, SAMPLE, 1024, Path(tmp) / "data", val_tokens)
        head = header(tg, seconds, seeds, cut)
        for i in range(seeds):
            for name in order:
                preset, overrides, _ = rows[name]
                env = {**base_env, **scaled_env(tg, preset, seconds), **overrides, "SEED": str(1337 + i),
                       "RUN_ID": f"{name}_s{1337 + i}", "LOG_DIR": str(out / "logs"),
                       "DATA_PATH": str(Path(tmp) / "data"), "TOKENIZER_PATH": str(TOKENIZER),
                       "ARTIFACT_PATH": str(Path(tmp) / f"{name}_s{1337 + i}.ptz")}
                print(f"[seed {1337 + i}] {name} ...", end=" ", flush=True)
                rec = run_row(logs_mod, name, env, out / "logs")
                records.append(rec)
                print(f"{rec['status']}" + (f" final bpb {rec['final']:.4f} ({rec['final_stage']}), "
                                            f"{rec['steps']} steps" if rec["status"] == "ok" else "")
                      + f", {rec['wall_s']:.0f}s wall", flush=True)
                write_results(out, records, rows, order, head)
    body, verdict = table(records, rows, order)
    print(f"\n{body}\n\n{verdict}\nwritten: {out / 'pipeline.csv'}, {out / 'pipeline.md'}, logs in {out / 'logs'}")


if __name__ == "__main__":
    main()
