"""Phased LoRA TTT: every target scored once, score-first, causal in processing order, rank-independent."""
import re

import numpy as np
import pytest
import torch
from conftest import tg

# Documents (tokens, BOS first) of varied length: longer than EVAL_SEQ_LEN=32, and of 1-2 tokens.
LENGTHS = [1, 2, 40, 70, 5, 33, 3, 12, 9]
LORA = dict(lora_ttt=1, lora_rank=4, lora_chunk=8, lora_docs_per_batch=3, lora_lr=0.01, lora_prefix_docs=4,
            lora_phases=2, ttt_epochs=1, ttt_chunk_tokens=16, ttt_seq_len=16, ttt_batch_seqs=2, ttt_optimizer="sgd",
            ttt_lr=0.01, ttt_freeze="")


def make_val(lead_bos=True, seed=0):
    g = np.random.default_rng(seed)
    tokens = g.integers(2, 1024, sum(LENGTHS) + 1)
    tokens[np.cumsum([0] + LENGTHS[:-1])] = tg.BOS_ID
    if not lead_bos:
        tokens[0] = 5
    luts = (torch.as_tensor(g.integers(1, 5, 1024), dtype=torch.int16), torch.as_tensor(g.random(1024) < 0.5),
            torch.arange(1024) == tg.BOS_ID)
    return tg.ValData(torch.as_tensor(tokens), *luts)


def model_for(h):
    torch.manual_seed(0)
    model = tg.GPT(h)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.03)
    return model


def run(h, val, tmp_path, name="nll", hints=None):
    """Per-target NLL of a LoRA TTT pass, in target order, and its (loss, bpb, tokens, bytes)."""
    dump = str(tmp_path / f"{name}.npz")
    result = tg.evaluate_lora_ttt(h, tg.Runtime(), model_for(h), val, dump=dump, hints=hints)
    data = np.load(dump)
    assert np.array_equal(data["target_index"], np.arange(val.tokens.numel() - 1))
    return data["nll"], result


@pytest.mark.parametrize("lead_bos", [True, False])
def test_every_target_once_with_the_plain_totals(tiny, tmp_path, lead_bos):
    h = tiny(**LORA)
    val = make_val(lead_bos)
    docs = tg.documents(val.tokens)
    assert docs[0, 0] == 0 and (docs[1:, 0] == docs[:-1, 1]).all() and docs[-1, 1] == val.tokens.numel() - 1
    assert len(tg.lora_phase_stops(h, tg.lora_batches(h, docs))) == 2  # both phases cut the stream
    _, (_, _, tokens, nbytes) = run(h, val, tmp_path)
    _, _, plain_tokens, plain_bytes = tg.evaluate(h, tg.Runtime(), model_for(h), val)
    assert (tokens, nbytes) == (plain_tokens, plain_bytes) == (val.tokens.numel() - 1, nbytes)


def test_changing_a_token_changes_nothing_scored_before_it(tiny, tmp_path):
    """Causal in processing order: a token changes neither its document's earlier targets nor any
    document of its batch or of earlier batches (later batches may change: warm A, global phases)."""
    h = tiny(**LORA)
    val = make_val()
    docs = tg.documents(val.tokens)
    batches = tg.lora_batches(h, docs)
    base, _ = run(h, val, tmp_path, "base")
    # the 70-token document (first batch) mid-chunk and at its end, the 40-token one (a global phase trains
    # on it), a 12-token one (second batch)
    for d, offset in ((3, 11), (3, 69), (2, 1), (7, 5)):
        p = int(docs[d, 0] + offset)
        changed = make_val()
        changed.tokens[p] = 2 + (int(changed.tokens[p]) - 1) % 1000
        nll, _ = run(h, changed, tmp_path, f"{d}_{offset}")
        batch = next(i for i, b in enumerate(batches) if d in b)
        same = np.zeros(len(base), dtype=bool)
        for e in np.concatenate(batches[:batch + 1]):
            same[docs[e, 0]:docs[e, 1]] = e != d
        same[docs[d, 0]:p - 1] = True
        assert np.array_equal(nll[same], base[same]), (d, offset)
        assert nll[p - 1] != base[p - 1] and not np.array_equal(nll, base)


def test_without_learning_it_is_the_per_document_window_score(tiny, tmp_path):
    """LORA_LR=0 and no phase: each chunk's targets scored by the base model on its document's slice
    of at most EVAL_SEQ_LEN tokens ending at the chunk's end, one unpadded window at a time."""
    h = tiny(**{**LORA, "lora_lr": 0, "lora_phases": 0})
    val = make_val()
    nll, _ = run(h, val, tmp_path)
    model = model_for(h).eval()
    ref = np.zeros_like(nll)
    with torch.no_grad():
        for s, e in tg.documents(val.tokens):
            for lo in range(0, e - s, h.lora_chunk):
                end = min(lo + h.lora_chunk, e - s)
                first = max(0, end - h.eval_seq_len)
                x, y = val.tokens[s + first:s + end][None], val.tokens[s + first + 1:s + end + 1][None]
                ref[s + lo:s + end] = model(x, y)[0, lo - first:].numpy()
    np.testing.assert_allclose(nll, ref, rtol=1e-5, atol=1e-5)


def test_a_last_chunk_never_trains_and_phases_see_only_scored_documents(tiny, monkeypatch):
    h = tiny(**LORA)
    val = make_val()
    docs = tg.documents(val.tokens)
    length = docs[:, 1] - docs[:, 0]
    for c in range(10):  # chunk c trains a document iff it is not the document's last
        _, _, _, scored, train = tg.lora_chunk_batch(h, val, docs[:3], c)
        assert train.tolist() == [8 * (c + 1) < n for n in length[:3]]
        assert scored.sum(1).tolist() == [max(0, min(8, n - 8 * c)) for n in length[:3]]
    scored, steps, phases = [], [], []
    chunk_batch = tg.lora_chunk_batch

    def spy_chunk(h, val, batch_docs, c):
        out = chunk_batch(h, val, batch_docs, c)
        scored.extend(map(tuple, batch_docs[out[3][:len(batch_docs)].any(1).numpy()].tolist()))
        steps.append(bool(out[4].any()))
        return out

    monkeypatch.setattr(tg, "lora_chunk_batch", spy_chunk)
    monkeypatch.setattr(tg, "lora_global_phase", lambda h, rt, model, val, d: phases.append((len(scored), d.copy())))
    tg.evaluate_lora_ttt(h, tg.Runtime(), model_for(h), val)
    for n_scored, phase_docs in phases:
        assert set(map(tuple, phase_docs.tolist())) <= set(scored[:n_scored])
    assert [len(d) for _, d in phases] == [2, 4]
    for b in tg.lora_batches(h, docs):  # a batch's steps: every chunk but its longest document's last
        assert steps[:(n := -(-int(length[b].max()) // 8))] == [True] * (n - 1) + [False]
        steps = steps[n:]


def test_a_reset_lora_leaves_the_logits_alone_and_each_run_has_its_adapters(tiny):
    h = tiny(num_layers=4, num_loops=2, loop_start=1, loop_end=2, parallel_start=3, lora_rank=4, lora_k=1,
             lora_docs_per_batch=2)
    model = model_for(h)
    model.looping = True
    lora = tg.LoRA(h, model)
    assert len(lora.a) == 8 * 5 + 1  # layer runs [0] + [1, 2] x 3 + [3], five adapters each, and the head
    x = torch.randint(0, 1024, (2, 16))
    with torch.no_grad():
        assert torch.equal(model.logits(x), model.logits(x, lora))
        lora.b["head"][1].fill_(0.1)
        lora.b["q3"][0].fill_(0.1)  # the second pass of layer 1, document slot 0 only
        diff = (model.logits(x, lora) - model.logits(x)).abs().amax((1, 2))
    assert (diff > 0).all()
    with torch.no_grad():
        lora.b["head"].zero_()
        first_row = (model.logits(x, lora) - model.logits(x)).abs().amax((1, 2))
    assert first_row[0] > 0 and first_row[1] == 0


@pytest.mark.parametrize("env, message", [
    (dict(lora_rank=0), "LORA_RANK=0 must be > 0"),
    (dict(lora_beta2=1.0), "LORA_BETA2=1.0 must be in [0, 1)"),
    (dict(lora_ttt=1, lora_chunk=64), "LORA_CHUNK=64 must be at most EVAL_SEQ_LEN=32"),
    (dict(lora_ttt=1, lora_chunk=8, ttt_epochs=0), "LORA_PHASES=1 needs TTT_EPOCHS > 0"),
    (dict(lora_ttt=1, lora_chunk=8, lora_phases=3, lora_prefix_docs=2), "at most LORA_PREFIX_DOCS=2 phases"),
    (dict(lora_wd=-1), "LORA_WD=-1.0 must be >= 0"),
])
def test_bad_settings_fail_in_one_line(tiny, env, message):
    with pytest.raises(tg.SettingsError, match=re.escape(message)) as e:
        tiny(**env)
    assert "\n" not in str(e.value)


def test_windows_and_graphs_are_bounded(make_settings):
    h = make_settings(lora_ttt=1, eval_seq_len=2560)
    assert tg.lora_windows(h) == [64, 128, 256, 512, 1024, 2048, 2560]
    assert tg.lora_windows(make_settings(lora_chunk=1, eval_seq_len=2560))[0] == 64  # at most 8 lengths
    assert tg.eval_passes(h) == ["lora_ttt"] and "lora_2560" in tg.expected_graphs(h, frozen=False)


def test_projection_counts_padded_windows_training_and_phases(tiny):
    h = tiny(**{**LORA, "lora_docs_per_batch": 2, "lora_prefix_docs": 2, "lora_phases": 1})
    model = model_for(h)
    f = lambda n: n * tg.forward_flops(h, model, n)  # noqa: E731 (a forward of one window of n tokens)
    windows, fwd, train = tg.pass_flops(h, model, "lora_ttt", 1, 42, np.array([10, 20, 5, 7]))
    # batches [10, 20] (chunks at 8, 16, 32 tokens; 2 steps) then [5, 7] (one chunk, no step); 2 rows each;
    # the phase after the first batch trains on its 30 tokens
    assert windows == 2 + 3 + 1 + 1 and fwd == pytest.approx(2 * (f(8) + f(16) + f(32)) + 2 * f(8))
    assert train == pytest.approx(3 * 2 * (f(8) + f(16)) + 3 * 30 * tg.forward_flops(h, model, h.ttt_seq_len))


def test_two_gloo_ranks_score_as_one(tiny, tmp_path):
    """Batches dealt to 2 ranks and a global phase split across them give the 1-rank score. LORA_LR=0:
    with learning adapters the ranks' warm-started A differ from one rank's by design (as the record's)."""
    import os
    import subprocess
    import sys
    from conftest import ROOT, SAMPLE, TOKENIZER, make_shards
    tokens = tg.read_shard(SAMPLE / "fineweb_val_000000.bin", 1024)[1:700].copy()
    tokens[np.cumsum([0, 150, 20, 3, 90, 45, 1, 120, 60, 12, 33, 70])] = tg.BOS_ID
    make_shards.write_shard(tmp_path / "fineweb_val_000000.bin", tokens)
    env = dict(DATA_PATH=str(tmp_path), TOKENIZER_PATH=str(TOKENIZER), DEVICE="cpu", COMPILE="0", NUM_LAYERS="2",
               MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2", EVAL_SEQ_LEN="32", EVAL_BATCH_TOKENS="256",
               QUANT_METHOD="rtn", COMPRESSOR="zstd", LOG_DIR=str(tmp_path), RUN_ID="art", OMP_NUM_THREADS="1",
               LORA_TTT="1", LORA_RANK="4", LORA_CHUNK="8", LORA_DOCS_PER_BATCH="2", LORA_LR="0",
               LORA_PREFIX_DOCS="4", LORA_PHASES="2", TTT_EPOCHS="1", TTT_CHUNK_TOKENS="64", TTT_SEQ_LEN="16",
               TTT_BATCH_SEQS="4", TTT_LR="0.01", TTT_OPTIMIZER="sgd")
    h = tiny(**env)
    artifact = tg.write_artifact(h, tg.Runtime(), model_for(h), None)
    scores = []
    for launcher in ([], ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]):
        proc = subprocess.run([sys.executable, *launcher, "train_gpt.py"], cwd=ROOT, capture_output=True, text=True,
                              timeout=300, env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", ""), **env,
                                                "EVAL_ARTIFACT": str(artifact), "RUN_ID": f"w{len(launcher)}"})
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert "lora_ttt_phase:2 docs:4" in proc.stdout and f"world_size:{1 + bool(launcher)}" in proc.stdout
        scores.append(re.search(r"^legal_lora_ttt_exact val_loss:([\d.]+) val_bpb:([\d.]+) scored_tokens:(\d+)",
                                proc.stdout, re.M).groups())
    (l1, b1, n1), (l2, b2, n2) = scores
    assert n1 == n2 == str(len(tokens) - 1)
    assert float(l1) == pytest.approx(float(l2), rel=1e-5) and float(b1) == pytest.approx(float(b2), rel=1e-5)


def test_the_record_tools_read_the_final_line():
    from conftest import ROOT, load_module
    logs = load_module("logs", ROOT / "records" / "tools" / "logs.py")
    line = "legal_lora_ttt_exact val_loss:2.50000000 val_bpb:1.25000000 scored_tokens:9 scored_bytes:20"
    assert logs.STAGES["ttt"].search(line).groups() == ("2.50000000", "1.25000000")


def test_the_ngram_tilt_scores_lora_ttt_and_leaves_its_training_untilted(tiny, tmp_path):
    """With NGRAM_ORDER the LoRA pass scores through the tilt: positions without a hint keep their NLL
    exactly (the adapters train on the untilted NLL, so nothing else moves), hinted ones follow the formula."""
    val = make_val()
    base, _ = run(tiny(**LORA), val, tmp_path, "base")
    h = tiny(**LORA, ngram_order=2, ngram_threshold=0.3)
    hints = tg.ngram_hints(h, val.tokens)
    tilted, (_, _, tokens, _) = run(h, val, tmp_path, "tilted", hints)
    hints = hints.numpy()
    assert tokens == val.tokens.numel() - 1 and (hints >= 0).sum() > 5
    free = hints < 0
    assert np.array_equal(tilted[free], base[free]) and not np.allclose(tilted[~free], base[~free])
    hit = (~free) & (val.tokens[1:].numpy() == hints)
    assert (tilted[hit] < base[hit]).all()  # the boost lowers the NLL of a target the hint names
