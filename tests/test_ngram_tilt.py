"""The causal token n-gram tilt: hints equal a per-token reference, never read the target or later
tokens, and tilt the scored distribution into another normalized one."""
import math

import numpy as np
import pytest
import sentencepiece as spm
import torch
from conftest import SAMPLE, TOKENIZER, tg


def reference_counts(tokens: list[int], order: int) -> list[tuple[int, int, int]]:
    """(hint, top count, total) per target, one token at a time with a dict, as the record's C loop."""
    k, state, out = order - 1, {}, []
    for i in range(1, len(tokens)):  # target i-1 predicts token i
        ctx = tuple(tokens[i - k:i]) if i >= k else None
        st = state.get(ctx)
        out.append((st["top"], st["top_count"], st["total"]) if st else (-1, 0, 0))
        if ctx is not None:  # only now absorb token i
            st = state.setdefault(ctx, {"top": -1, "top_count": 0, "total": 0, "counts": {}})
            c = st["counts"][tokens[i]] = st["counts"].get(tokens[i], 0) + 1
            st["total"] += 1
            if c > st["top_count"]:  # strictly: a tie keeps the token that got there first
                st["top"], st["top_count"] = tokens[i], c
    return out


def stream(rng, n: int, vocab: int) -> list[int]:
    """Random tokens with copied spans, so that long contexts repeat."""
    tokens = rng.integers(0, vocab, n)
    for _ in range(n // 20):
        length = int(rng.integers(2, 20))
        a, b = (int(rng.integers(0, max(1, n - length))) for _ in range(2))
        tokens[b:b + length] = tokens[a:a + length].copy()
    return tokens.tolist()


def counts(tokens: list[int], order: int) -> list[tuple[int, int, int]]:
    return list(zip(*(t.tolist() for t in tg.ngram_counts(torch.tensor(tokens), order))))


def test_hints_equal_the_per_token_reference():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n, vocab, order = int(rng.integers(2, 400)), int(rng.integers(1, 8)), int(rng.integers(2, 18))
        tokens = stream(rng, n, vocab)
        assert counts(tokens, order) == reference_counts(tokens, order), (n, vocab, order)


def test_a_tie_keeps_the_token_that_got_there_first():
    A, X, Y = 5, 1, 2
    got = counts([A, X, A, Y, A, Y, A, X, A, X], 2)  # targets 0, 2, .. 8 follow A: X, Y, Y, X, X
    assert [got[t] for t in (0, 2, 4, 6, 8)] == [(-1, 0, 0), (X, 1, 1), (X, 1, 2), (Y, 2, 3), (Y, 2, 4)]


def test_hints_never_read_the_target_or_later_tokens():
    """Change the token at position p and everything after it: the hints of targets before p (tokens at
    positions <= p) stay the same."""
    rng = np.random.default_rng(1)
    tokens = torch.tensor(stream(rng, 3000, 6))
    h = type("H", (), dict(ngram_order=4, ngram_threshold=0.5))
    base = tg.ngram_hints(h, tokens)
    assert (base >= 0).sum() > 100
    for p in rng.choice(np.arange(1, 3000), size=20, replace=False).tolist():
        changed = tokens.clone()
        changed[p] = (changed[p] + 1) % 6
        changed[p + 1:] = torch.as_tensor(rng.integers(0, 6, 3000 - p - 1))
        assert torch.equal(tg.ngram_hints(h, changed)[:p], base[:p]), p


def test_the_threshold_gates_on_the_share_of_earlier_occurrences():
    rng = np.random.default_rng(2)
    tokens = stream(rng, 2000, 4)
    hint, top, total = (torch.tensor(c) for c in zip(*reference_counts(tokens, 3)))
    for threshold in (0.25, 0.5, 0.8, 1.0):
        h = type("H", (), dict(ngram_order=3, ngram_threshold=threshold))
        fire = (total > 0) & (top / total.clamp(min=1) >= threshold)
        assert torch.equal(tg.ngram_hints(h, torch.tensor(tokens)), torch.where(fire, hint, -1))


def test_the_tilted_distribution_is_normalized_and_matches_the_closed_form():
    torch.manual_seed(0)
    V, boost = 50, 2.625
    logits = torch.randn(3, 7, V) * 4
    hint = torch.randint(-1, V, (3, 7))
    log_probs = torch.log_softmax(logits, -1)
    tilted = tg.tilt_log_probs(log_probs.flatten(0, 1), hint.flatten(), boost).view_as(log_probs)
    assert torch.allclose(tilted.double().exp().sum(-1), torch.ones(3, 7, dtype=torch.float64), atol=1e-5)
    assert torch.equal(tilted[hint < 0], log_probs[hint < 0])
    q = log_probs.gather(-1, hint.clamp(min=0)[..., None])[..., 0].double().exp()
    for a in range(V):  # every candidate target
        y = torch.full_like(hint, a)
        nll = tg.tilt_nll(tg.nll_pair(logits, y, hint.clamp(min=0)), hint, y, boost)
        closed = -log_probs[..., a].double() - boost * (hint == a) + torch.log(1 + q * (math.exp(boost) - 1))
        assert torch.allclose(nll, torch.where(hint >= 0, closed, -log_probs[..., a].double()), atol=1e-5)
        assert torch.allclose(nll, -tilted[..., a].double(), atol=1e-5)


@pytest.fixture(scope="module")
def val():
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    tokens = tg.read_shard(SAMPLE / "fineweb_val_000000.bin", 1024)[:600].astype(np.int64)
    return tg.ValData(torch.as_tensor(tokens), *tg.build_byte_luts(sp, 1024))


def test_the_tilt_changes_only_the_scores(tiny, val):
    """Same tokens and bytes as without the tilt, another loss; the fused graph path (no on_scored) gives
    the loss of the full-distribution path."""
    h = tiny(eval_seq_len=64, eval_stride=32, ngram_order=3, ngram_threshold=0.5)
    torch.manual_seed(0)
    model = tg.GPT(h)
    rt = tg.Runtime()
    hints = tg.ngram_hints(h, val.tokens)
    assert (hints >= 0).sum() > 50
    plain = tg.evaluate(h, rt, model, val, stride=32)
    tilted = tg.evaluate(h, rt, model, val, stride=32, hints=hints)
    full = tg.evaluate(h, rt, model, val, stride=32, hints=hints, on_scored=lambda *_: None)
    assert tilted[2:] == plain[2:] and tilted[0] != pytest.approx(plain[0], rel=1e-4)
    assert tilted[0] == pytest.approx(full[0], rel=1e-6)


def test_bad_settings_give_one_line_errors(make_settings):
    for env, match in [(dict(NGRAM_ORDER=1), "NGRAM_ORDER=1 must be 0"), (dict(NGRAM_ORDER=-3), "NGRAM_ORDER=-3"),
                       (dict(NGRAM_THRESHOLD=0), "NGRAM_THRESHOLD=0.0 must be in"),
                       (dict(NGRAM_THRESHOLD=1.5), "NGRAM_THRESHOLD=1.5"), (dict(NGRAM_BOOST=0), "NGRAM_BOOST=0.0"),
                       (dict(NGRAM_ORDER="x"), "NGRAM_ORDER='x' is not an integer")]:
        with pytest.raises(tg.SettingsError, match=match) as e:
            make_settings(**env)
        assert "\n" not in str(e.value)
    assert make_settings().ngram_order == 0  # off by default
