"""The CUDA path as far as a CPU can check it: FlashAttention-3's contract enforced by a strict double,
CUDA autocast's fp32 rms_norm, bounded compiled graphs, bounded varlen segments, fixed-shape eval and
TTT batches, the agreed clock, the eval projection and the size limit."""
import functools
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, SAMPLE, TOKENIZER, tg

BOS = tg.BOS_ID
HALF = (torch.float16, torch.bfloat16)


def reference_attention(q, k, v, segments):
    """Causal softmax attention in fp32 inside each [a, b) of segments over (total, H, D) tensors."""
    rep = q.size(1) // k.size(1)
    k, v = k.float().repeat_interleave(rep, 1), v.float().repeat_interleave(rep, 1)
    out = torch.zeros(q.shape, dtype=torch.float32)
    for a, b in segments:
        if b > a:
            s = torch.einsum("thd,shd->hts", q[a:b].float(), k[a:b]) / math.sqrt(q.size(-1))
            s = s.masked_fill(~torch.ones(b - a, b - a, dtype=torch.bool).tril(), float("-inf"))
            out[a:b] = torch.einsum("hts,shd->thd", s.softmax(-1), v[a:b])
    return out


class StrictFA3:
    """flash_attn_interface as FA3 enforces it: fp16/bf16 only and one dtype for q, k, v; (B, T, H, D)
    dense or (total, H, D) varlen; last dim contiguous; head dim <= 256; query heads a multiple of KV
    heads; int32 cu_seqlens of total+1 at the end; int max_seqlen. Some builds return (out, lse)."""

    def __init__(self, returns_lse: bool):
        self.returns_lse, self.calls = returns_lse, []

    def check(self, q, k, v, ndim):
        for t in (q, k, v):
            assert t.dtype in HALF, f"FlashAttention only supports fp16 and bf16, got {t.dtype}"
            assert t.dim() == ndim, f"expected {ndim}-d tensors, got {tuple(t.shape)}"
            assert t.stride(-1) == 1, "input tensor must have contiguous last dimension"
        assert q.dtype == k.dtype == v.dtype, f"query and key must have the same dtype ({q.dtype}, {k.dtype}, {v.dtype})"
        assert q.size(-1) <= 256 and k.shape == v.shape and q.size(-1) == k.size(-1)
        assert q.size(-2) % k.size(-2) == 0, "number of heads in key/value must divide number of heads in query"

    def _out(self, out, q):
        self.calls.append(q.dtype)
        out = out.to(q.dtype)
        lse = torch.zeros(q.shape[:-1], dtype=torch.float32)
        return (out, lse) if self.returns_lse else out

    def dense(self, q, k, v, softmax_scale=None, causal=False):
        self.check(q, k, v, 4)
        assert causal
        B, T = q.shape[:2]
        flat = [t.reshape(B * T, *t.shape[2:]) for t in (q, k, v)]
        return self._out(reference_attention(*flat, [(i * T, (i + 1) * T) for i in range(B)]).view(q.shape), q)

    def varlen(self, q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=False):
        self.check(q, k, v, 3)
        assert causal and torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32 and cu_q.dim() == 1
        assert int(cu_q[-1]) == q.size(0) and bool((cu_q[1:] >= cu_q[:-1]).all())
        assert isinstance(max_q, int) and int((cu_q[1:] - cu_q[:-1]).max()) <= max_q
        bounds = cu_q.tolist()
        return self._out(reference_attention(q, k, v, list(zip(bounds, bounds[1:]))), q)


@pytest.fixture(params=[False, True], ids=["returns_out", "returns_out_lse"])
def fa3(request, monkeypatch):
    double = StrictFA3(request.param)
    monkeypatch.setattr(tg, "flash_attn_func", double.dense)
    monkeypatch.setattr(tg, "flash_attn_varlen_func", double.varlen)
    return double


def cuda_autocast_policy(monkeypatch):
    """CUDA autocast of torch >= 2.12 runs rms_norm in fp32 (ATen/autocast_mode.h); CPU autocast does
    not, so the test forces it, as a user's GPU would."""
    rms_norm = F.rms_norm
    monkeypatch.setattr(F, "rms_norm", lambda *a, **k: rms_norm(*a, **k).float())
    return torch.autocast("cpu", dtype=torch.bfloat16)


def doc_ids_batch():
    torch.manual_seed(0)
    ids = torch.randint(4, 1024, (2, 24))
    ids[0, [0, 5, 6, 17]] = BOS  # documents of 5, 1, 11 and 7 tokens
    ids[1, [9]] = BOS  # the row starts inside a document
    return ids


def test_the_double_refuses_what_fa3_refuses():
    double = StrictFA3(False)
    q = torch.randn(1, 8, 4, 16, dtype=torch.bfloat16)
    with pytest.raises(AssertionError, match="fp16 and bf16"):
        double.dense(q.float(), q.float(), q.float(), causal=True)
    with pytest.raises(AssertionError, match="same dtype"):
        double.dense(q, q, q.half(), causal=True)
    with pytest.raises(AssertionError, match="contiguous last"):
        double.dense(q.transpose(-1, -2).contiguous().transpose(-1, -2), q, q, causal=True)
    with pytest.raises(AssertionError, match="must divide"):
        double.dense(q, q[:, :, :3], q[:, :, :3], causal=True)
    with pytest.raises(AssertionError):
        double.varlen(q[0], q[0], q[0], torch.tensor([0, 8]), torch.tensor([0, 8]), 8, 8, causal=True)  # int64


def test_fa3_glue_matches_sdpa(fa3):
    """Dense and varlen FA3 calls (layout, dtype, cu_seqlens, either return type) give SDPA's result."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 24, 4, 16), torch.randn(2, 24, 2, 16), torch.randn(2, 24, 2, 16)
    for doc_ids in (None, doc_ids_batch()):
        for max_docs in (3, 8):
            got = tg.attend(q, k, v, doc_ids, fa3=True, max_docs=max_docs)
            want = tg.attend(q, k, v, doc_ids, fa3=False, max_docs=max_docs)
            assert got.dtype == torch.bfloat16 and torch.allclose(got.float(), want, atol=3e-2)
    assert fa3.calls and all(dt == torch.bfloat16 for dt in fa3.calls)


def test_varlen_segments_are_bounded():
    """cu_seqlens has rows + DOC_MASK_MAX_DOCS + 1 entries whatever the batch: row starts always, then
    the batch's first max_docs inner BOS (FA3's backward sizes buffers by the segment count)."""
    ids = doc_ids_batch()
    starts = tg.doc_starts(ids, 8)
    assert tg.doc_segments(starts, 8).tolist() == [0, 5, 6, 17, 24, 33, 48, 48, 48, 48, 48]
    capped = tg.doc_segments(tg.doc_starts(ids, 3), 3)
    assert capped.dtype == torch.int32 and capped.tolist() == [0, 5, 6, 17, 24, 48]  # 33 is over the cap
    all_bos = torch.full((48, 2048), BOS)
    assert tg.doc_segments(tg.doc_starts(all_bos, 512), 512).numel() == 48 + 512 + 1  # not 48 * 2048 + 1


@pytest.mark.parametrize("doc_mask", [False, True])
def test_model_trains_on_fa3_under_cuda_autocast_policy(tiny, fa3, monkeypatch, doc_mask):
    """Forward and backward on the FA3 path with bf16 autocast and fp32 rms_norm: q/k come out of
    QK-norm in fp32 while v is bf16, and FA3 must still get one half dtype."""
    h = tiny(doc_mask=int(doc_mask), ve_dim=16, ve_layers="0,1", xsa_last_n=2)
    torch.manual_seed(0)
    model = tg.GPT(h)
    model.fa3 = True
    ids = torch.randint(4, 1024, (2, 32))
    ids[:, [0, 11]] = BOS
    with cuda_autocast_policy(monkeypatch):
        loss = model(ids, torch.roll(ids, -1, 1)).mean()
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert fa3.calls and all(dt == torch.bfloat16 for dt in fa3.calls)


def test_decoding_under_cuda_autocast_policy(tiny, monkeypatch):
    """Self-generated calibration (SDPA over the KV cache) under the same policy."""
    h = tiny(calib_seqs=2, calib_len=8)
    model = tg.GPT(h)
    rt = tg.Runtime()
    monkeypatch.setattr(tg.Runtime, "autocast", lambda self: cuda_autocast_policy(monkeypatch))
    out = tg.generate_calibration(h, rt, model)
    assert out.shape == (2, 8)


def test_fixed_shape_eval_gives_the_same_scores(tiny):
    """Padding windows and batches to one shape (eval_rows) changes no score."""
    sp_val = tg.read_shard(SAMPLE / "fineweb_val_000000.bin", 1024)[:900].astype(np.int64)
    import sentencepiece as spm
    val = tg.ValData(torch.as_tensor(sp_val), *tg.build_byte_luts(spm.SentencePieceProcessor(model_file=str(TOKENIZER)), 1024))
    results = []
    for batch in (64 * 3, 64 * 100):  # 3 windows per forward (a short last batch) vs all in one
        h = tiny(eval_seq_len=64, eval_stride=16, eval_batch_tokens=batch)
        torch.manual_seed(0)
        model = tg.GPT(h)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.03)
        results.append(tg.evaluate(h, tg.Runtime(), model, val, stride=16))
    (l1, b1, t1, n1), (l2, b2, t2, n2) = results
    assert (t1, n1) == (t2, n2) == (899, int(val.bytes_at(torch.arange(899)).sum()))
    assert b1 == pytest.approx(b2, rel=1e-5) and l1 == pytest.approx(l2, rel=1e-5)


def test_ttt_rows():
    """One rank's share of a TTT step runs in as few fixed-shape forwards as fit a training micro-batch."""
    h = type("H", (), dict(ttt_batch_seqs=32, train_batch_tokens=786432, ttt_seq_len=2048, ttt_chunk_tokens=131072))
    assert tg.ttt_rows(h, 8) == (1, 4) and tg.ttt_rows(h, 1) == (1, 32)
    h.ttt_batch_seqs = 256  # PR #585: up to 32 per rank on 8 GPUs, but a chunk holds 64 sequences
    assert tg.ttt_rows(h, 8) == (1, 8) and tg.ttt_rows(h, 1) == (2, 32)
    h.ttt_chunk_tokens = 10 ** 6  # 489 sequences: the step's 256 bound it
    assert tg.ttt_rows(h, 8) == (1, 32) and tg.ttt_rows(h, 1) == (6, 43)


def _ttt_val():
    import sentencepiece as spm
    tokens = tg.read_shard(SAMPLE / "fineweb_val_000000.bin", 1024)[:400].astype(np.int64)
    return tg.ValData(torch.as_tensor(tokens), *tg.build_byte_luts(spm.SentencePieceProcessor(model_file=str(TOKENIZER)), 1024))


def test_batched_ttt_step_equals_one_sequence_at_a_time(tiny, monkeypatch):
    """Padded rows and positions weigh nothing: a step over 3 sequences (the last one short) in one
    forward moves the weights exactly as three one-sequence forwards do."""
    val = _ttt_val()
    h = tiny(ttt_epochs=1, ttt_seq_len=40, ttt_batch_seqs=3, ttt_optimizer="sgd", ttt_grad_clip=0)
    after = []
    for rows in (None, 1):
        if rows:
            monkeypatch.setattr(tg, "ttt_rows", lambda h, world: (3, 1))
        torch.manual_seed(0)
        model = tg.GPT(h)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.03)
        params = tg.ttt_parameters(h, model)
        tg.ttt_train_chunk(h, tg.Runtime(), model, val, params, tg.ttt_optimizer(h, params), 0.1, 0, 100)
        after.append([p.detach().clone() for p in params])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*after))
    assert not all(torch.equal(a, b) for a, b in zip(after[0], [p.detach() for p in tg.GPT(h).parameters()]))


def test_ttt_lr_cosine_ends_after_the_last_trained_chunk(tiny, monkeypatch):
    """lr_c = TTT_LR * (1 + cos(pi c / (chunks - 1))) / 2 for the chunks trained on (all but the last):
    the last trained chunk still learns (PR #585's schedule)."""
    seen = []
    monkeypatch.setattr(tg, "ttt_train_chunk", lambda h, rt, model, val, params, opt, lr, lo, hi: seen.append(lr))
    h = tiny(eval_seq_len=64, eval_stride=32, ttt_epochs=1, ttt_chunk_tokens=100, ttt_lr=0.01)
    tg.evaluate_ttt(h, tg.Runtime(), tg.GPT(h), _ttt_val())
    n = math.ceil(399 / 100)
    assert seen == pytest.approx([0.01 * 0.5 * (1 + math.cos(math.pi * c / (n - 1))) for c in range(n - 1)])
    assert seen[0] == pytest.approx(0.01) and seen[-1] > 0


def test_eval_passes(make_settings):
    assert tg.eval_passes(make_settings()) == ["ttt"]  # the default: one fused TTT + sliding pass
    assert tg.eval_passes(make_settings(PRESET="pr592")) == ["sliding"]
    assert tg.eval_passes(make_settings(PRESET="baseline")) == ["plain"]
    assert tg.eval_passes(make_settings(EVAL_PASSES="sliding,plain")) == ["sliding", "plain", "ttt"]
    with pytest.raises(tg.SettingsError, match="EVAL_PASSES='slot'"):
        make_settings(EVAL_PASSES="slot")
    with pytest.raises(tg.SettingsError, match="EVAL_PASSES"):
        make_settings(PRESET="baseline", EVAL_PASSES="sliding")  # no sliding stride


@pytest.mark.parametrize("preset", ["", "pr585", "pr1683", "pr592", "pr578", "pr1319", "frontier", "pr1855"])
def test_every_preset_evaluates_within_600s_of_8xh100(make_settings, preset, capsys):
    """PLAN's projection: the FLOPs of each pass at PLAN_MFU of 8 H100s, on the official validation set."""
    h = make_settings(PRESET=preset)
    with torch.device("meta"):  # the projection needs shapes only
        model = tg.GPT(h)
    rate = tg.H100_BF16_FLOPS * h.plan_mfu
    total = tg.log_eval_projection(h, model, 8, tg.official_val_tokens(h)[0] - 1, rate, rate, tg.NGRAM_CPU_TOKENS_PER_S,
                                   None, "test")
    out = capsys.readouterr().out
    assert total <= 600 and "fits:True" in out
    assert [line.split()[1] for line in out.splitlines() if "pass:" in line] == [f"pass:{p}" for p in tg.eval_passes(h)]


def test_projection_counts_ttt_training_and_slot(make_settings):
    h = make_settings()
    model = tg.GPT(make_settings(NUM_LAYERS=2, MODEL_DIM=64, NUM_HEADS=4, NUM_KV_HEADS=2))
    n = 10 ** 6
    windows, fwd, train = tg.pass_flops(h, model, "ttt", 8, n)
    per_token = tg.forward_flops(h, model, 2048)
    assert windows == len(tg.plan_windows(n, 2048, 32)) and fwd >= windows / 8 * 2048 * per_token
    chunks, steps = math.ceil(n / 131072), math.ceil(64 / 32)  # 64 sequences a chunk, 32 a step
    assert train == (chunks - 1) * 3 * steps * 4 * 2048 * 3 * per_token  # 4 rows per rank
    h.ttt_epochs, h.slot_steps = 0, 8
    _, _, slot = tg.pass_flops(h, model, "sliding", 8, n)
    rows = tg.eval_rows(h, 8, n)
    padded = math.ceil(math.ceil(len(tg.plan_windows(n, 2048, 32)) / 8) / rows) * rows  # the busiest rank's windows
    assert slot == 8 * 64 * 6 * 512 * 1024 * padded  # 8 steps over 64 positions, 3x the head's 2*d*V


def _bounded_graph_run(small_data, make_settings, monkeypatch, **env):
    """A whole tiny run with COMPILE=1 (dynamo with the eager backend: the same graphs and guards as
    inductor, without C++ builds); returns (graphs compiled, graphs expected)."""
    from torch._dynamo.utils import counters
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    tg._compiled.cache_clear()
    torch._dynamo.reset()
    counters.clear()
    h = make_settings(**{**dict(DATA_PATH=str(small_data), TOKENIZER_PATH=str(TOKENIZER), DEVICE="cpu", COMPILE=1,
                             NUM_LAYERS=2, MODEL_DIM=64, NUM_HEADS=4, NUM_KV_HEADS=2, TRAIN_SEQ_LEN=32,
                             EVAL_SEQ_LEN=64, EVAL_BATCH_TOKENS=1024, TRAIN_BATCH_TOKENS=256, GRAD_ACCUM_STEPS=1,
                             ITERATIONS=6, WARMUP_STEPS=2, MAX_WALLCLOCK_SECONDS=0, WARMDOWN_ITERS=4,
                             QAT_THRESHOLD=0.9, VAL_LOSS_EVERY=3, CALIB_SEQS=2, CALIB_LEN=16, LOG_DIR=str(small_data),
                             RUN_ID="graphs", QUANT_MIN_NUMEL=1024, COMPRESSOR="zstd"), **env})
    try:
        tg.train_and_eval(h, tg.Runtime())
    finally:
        tg._compiled.cache_clear()
        torch._dynamo.reset()
    return tg.compiled_graph_count(), tg.expected_graphs(h, frozen=True)


GRAPH_MODES = {
    "ttt": dict(EVAL_STRIDE=32, TTT_EPOCHS=1, TTT_CHUNK_TOKENS=1000, TTT_SEQ_LEN=32, TTT_BATCH_SEQS=4),
    "slot": dict(EVAL_STRIDE=32, TTT_EPOCHS=0, SLOT_STEPS=2, EVAL_PASSES="plain"),
    # the tilt's scoring graph replaces the frozen eval graph in every final pass
    "ttt_ngram": dict(EVAL_STRIDE=32, TTT_EPOCHS=1, TTT_CHUNK_TOKENS=1000, TTT_SEQ_LEN=32, TTT_BATCH_SEQS=4,
                      NGRAM_ORDER=3, EVAL_PASSES="plain"),
    # the sample's first 4,000 val tokens are one document: no global phase (its graph is TTT's)
    "lora": dict(LORA_TTT=1, LORA_RANK=4, LORA_CHUNK=16, LORA_DOCS_PER_BATCH=2, LORA_PHASES=0, EVAL_SEQ_LEN=32),
    # The recurrence switch and context growth: 2 lengths x looping off/on, all compiled in the warm-up; LoRA
    # TTT through the tilt.
    "frontier": dict(PRESET="frontier", VOCAB_SIZE=1024, NUM_LAYERS=4, LOOP_START=1, LOOP_END=2, PARALLEL_START=3,
                     TRAIN_SEQ_SCHEDULE="16@0.5,32@1", QAT_THRESHOLD=0, EVAL_SEQ_LEN=32, LORA_RANK=4, LORA_CHUNK=16,
                     LORA_DOCS_PER_BATCH=2, LORA_PHASES=0, TTT_EPOCHS=0),
}


@pytest.mark.parametrize("mode", list(GRAPH_MODES))
def test_a_full_compiled_run_compiles_only_the_listed_graphs(small_data, make_settings, monkeypatch, capsys, mode):
    count, expected = _bounded_graph_run(small_data, make_settings, monkeypatch, **GRAPH_MODES[mode])
    out = capsys.readouterr().out
    assert count == len(expected) <= (10 if mode == "frontier" else 8), (count, expected, out[-2000:])
    assert f"compiled_graphs:{count} expected_at_most:{len(expected)}" in out
    assert "eval_projection total:" in out
    if mode == "frontier":
        assert expected == ["train_16", "train_16_loop", "train_32", "train_32_loop", "eval", "eval_loop",
                            "eval_loop_ngram", "lora_16", "lora_32"]
        assert "legal_lora_ttt_exact" in out and "ngram_tilt: order:16" in out
        assert "looping:enabled step:3" in out and "train_seq_len:32 step:4" in out
    else:
        assert "qat:enabled" in out
    if mode == "ttt_ngram":
        assert "eval_ngram" in expected and "eval_frozen" not in expected
        assert "eval_projection ngram_tilt tokens:4000 " in out and "ngram_tilt: order:3 threshold:0.8 " in out


def test_ranks_decide_the_schedule_on_one_clock(small_data, tmp_path):
    """Rank 1's clock runs 3x fast: every time-based decision (LR, QAT, SWA, the stop) still sees the
    same clock on both ranks, the all-reduced one."""
    script = tmp_path / "skewed.py"
    script.write_text(f"""
import json, os, sys, time
sys.path.insert(0, {str(ROOT)!r})
import importlib.util
spec = importlib.util.spec_from_file_location("train_gpt", {str(ROOT / 'train_gpt.py')!r})
tg = importlib.util.module_from_spec(spec); sys.modules["train_gpt"] = tg; spec.loader.exec_module(tg)
rank = int(os.environ["RANK"])
real = time.perf_counter
start = real()
if rank == 1:
    tg.time.perf_counter = lambda: start + 3 * (real() - start)
seen = []
step = tg.Trainer.step
tg.Trainer.step = lambda self, s, ms: (seen.append((s, ms)), step(self, s, ms))[1]

def train_only(h, rt):  # the training loop alone; main() then tears the process group down as usual
    tg.Trainer(h, rt, tg.build_model(h, rt), tg.load_val_data(h, tg.load_tokenizer(h))).run()
    open(os.path.join({str(tmp_path)!r}, f"clock{{rank}}.json"), "w").write(json.dumps(seen))

tg.train_and_eval = train_only
tg.main()
""")
    env = dict(DATA_PATH=str(small_data), TOKENIZER_PATH=str(TOKENIZER), DEVICE="cpu", COMPILE="0", NUM_LAYERS="2",
               MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2", TRAIN_SEQ_LEN="32", EVAL_SEQ_LEN="64",
               TRAIN_BATCH_TOKENS="256", GRAD_ACCUM_STEPS="1", ITERATIONS="8", MAX_WALLCLOCK_SECONDS="3600",
               VAL_LOSS_EVERY="0", LOG_DIR=str(tmp_path), OMP_NUM_THREADS="1")
    env.update({k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME", "LANG")})
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    zero, one = (json.loads((tmp_path / f"clock{r}.json").read_text()) for r in (0, 1))
    assert len(zero) == 8 and zero == one


def test_an_artifact_over_the_limit_ends_the_run(tiny, tmp_path):
    h = tiny(size_limit=1000, target_bytes=-1, quant_method="rtn", artifact_path=str(tmp_path / "big.ptz"))
    with pytest.raises(tg.ArtifactError, match=r"over SIZE_LIMIT=1000: lower QUANT_BITS_\*"):
        tg.write_artifact(h, tg.Runtime(), tg.GPT(h), None)

