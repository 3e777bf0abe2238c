"""Every evaluation mode: each token scored exactly once, and causal (proven by changing the future)."""
import numpy as np
import pytest
import sentencepiece as spm
import torch
from conftest import SAMPLE, TOKENIZER, tg

N_TOKENS = 700


@pytest.fixture(scope="module")
def val():
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    tokens = tg.read_shard(SAMPLE / "fineweb_val_000000.bin", 1024)[:N_TOKENS].astype(np.int64)
    return tg.ValData(torch.as_tensor(tokens), *tg.build_byte_luts(sp, 1024))


def _model(h):
    torch.manual_seed(0)
    model = tg.GPT(h)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.03)
    return model


MODES = {  # name -> (settings, runner)
    "plain": (dict(eval_seq_len=64, eval_stride=0), "plain"),
    "sliding": (dict(eval_seq_len=64, eval_stride=16), "sliding"),
    "sliding_short_stride": (dict(eval_seq_len=50, eval_stride=7), "sliding"),
    "ttt": (dict(eval_seq_len=64, eval_stride=16, ttt_chunk_tokens=150, ttt_epochs=2, ttt_lr=0.05,
                 ttt_seq_len=32, ttt_batch_seqs=2, ttt_optimizer="sgd"), "ttt"),
    "ttt_plain_windows_ema": (dict(eval_seq_len=64, eval_stride=0, ttt_chunk_tokens=200, ttt_epochs=1,
                                   ttt_lr=0.01, ttt_seq_len=40, ttt_batch_seqs=3, ttt_ema=0.5), "ttt"),
    "qttt": (dict(eval_seq_len=64, eval_stride=32, ttt_chunk_tokens=128, ttt_epochs=2, ttt_lr=0.05,
                  ttt_seq_len=32, ttt_batch_seqs=2, ttt_params="q", ttt_optimizer="sgd"), "ttt"),
    "slot": (dict(eval_seq_len=64, eval_stride=16, slot_steps=3, slot_lr=0.05, slot_lr_end=0.01,
                  eval_batch_tokens=128), "slot"),
}
TILT = dict(ngram_order=3, ngram_threshold=0.5)  # fires on 105 of the 699 targets here
MODES.update({f"{name}_ngram_tilt": ({**MODES[name][0], **TILT}, MODES[name][1])
              for name in ("sliding", "ttt")})  # SLOT and plain windows score through the same code as these


def run_mode(h, mode, val, dump=""):
    """(result, {target index: log-probs}) for one evaluation mode on a fresh copy of the model."""
    model = _model(h)
    rows = {}

    def keep(targets, logprobs):
        for t, row in zip(targets.tolist(), logprobs):
            assert t not in rows, f"target {t} scored twice"
            rows[t] = row.clone()

    rt = tg.Runtime()
    hints = tg.ngram_hints(h, val.tokens) if h.ngram_order else None  # from the (possibly changed) stream
    if mode == "ttt":
        result = tg.evaluate_ttt(h, rt, model, val, dump=dump, on_scored=keep, hints=hints)
    else:
        stride = h.eval_stride if mode != "plain" else None
        result = tg.evaluate(h, rt, model, val, stride=stride, slot=mode == "slot", dump=dump, on_scored=keep,
                             hints=hints)
    return result, rows


@pytest.mark.parametrize("name", list(MODES))
def test_every_token_is_scored_exactly_once(tiny, val, name, tmp_path):
    env, mode = MODES[name]
    h = tiny(**env)
    (loss, bpb, tokens, nbytes), rows = run_mode(h, mode, val, dump=str(tmp_path / "dump.npz"))
    assert sorted(rows) == list(range(N_TOKENS - 1)) and tokens == N_TOKENS - 1
    assert nbytes == int(val.target_bytes(val.tokens[:-1], val.tokens[1:]).sum())
    dump = np.load(tmp_path / "dump.npz")
    assert dump["target_index"].tolist() == list(range(N_TOKENS - 1))
    assert int(dump["bytes"].sum()) == nbytes
    assert float(dump["nll"].astype(np.float64).mean()) == pytest.approx(loss, rel=1e-5)
    assert bpb == pytest.approx(dump["nll"].astype(np.float64).sum() / (np.log(2) * nbytes), rel=1e-5)


@pytest.mark.parametrize("name", list(MODES))
def test_every_mode_is_causal(tiny, val, name):
    """Change every token at positions >= p: the distributions of the tokens at positions <= p stay."""
    env, mode = MODES[name]
    h = tiny(**env)
    _, base = run_mode(h, mode, val)
    rng = np.random.default_rng(len(name))
    for p in sorted(rng.choice(np.arange(2, N_TOKENS - 1), size=3, replace=False).tolist()):
        tokens = val.tokens.clone()
        tokens[p:] = torch.as_tensor(rng.integers(0, 1024, N_TOKENS - p))
        _, changed = run_mode(h, mode, tg.ValData(tokens, val.base_bytes, val.has_space, val.is_boundary))
        for t in range(p):  # target t is the token at position t+1 <= p
            assert torch.allclose(base[t], changed[t], atol=1e-6), (name, p, t)
        assert any(not torch.allclose(base[t], changed[t], atol=1e-6) for t in range(p, N_TOKENS - 1))


def test_ttt_and_slot_really_change_the_predictions(tiny, val):
    """The adaptive modes are not the plain sliding pass in disguise."""
    _, sliding = run_mode(tiny(**MODES["sliding"][0]), "sliding", val)
    _, ttt = run_mode(tiny(**MODES["ttt"][0]), "ttt", val)
    _, slot = run_mode(tiny(**MODES["slot"][0]), "slot", val)
    first_chunk = range(150)
    assert all(torch.allclose(sliding[t], ttt[t], atol=1e-6) for t in first_chunk)  # nothing learned yet
    assert not all(torch.allclose(sliding[t], ttt[t], atol=1e-4) for t in range(150, N_TOKENS - 1))
    assert not all(torch.allclose(sliding[t], slot[t], atol=1e-4) for t in range(64, N_TOKENS - 1))


def test_qttt_trains_only_query_projections(tiny, val):
    h = tiny(**MODES["qttt"][0])
    model = _model(h)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tg.evaluate_ttt(h, tg.Runtime(), model, val)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.endswith("attn.c_q.weight") for n in changed)
    h2 = tiny(**MODES["ttt"][0])
    model = _model(h2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tg.evaluate_ttt(h2, tg.Runtime(), model, val)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert not any(n.startswith(("tok_emb", "bigram", "ve")) for n in changed)  # the default freeze list
    assert any("mlp" in n for n in changed)


def test_windows_cover_all_targets():
    for n, seq, stride in [(1000, 64, 16), (1000, 64, 64), (10, 64, 16), (64, 64, 8), (65, 64, 1), (100, 50, 200)]:
        w = tg.plan_windows(n, seq, stride)
        covered = []
        for start, first in w:
            length = min(seq, n - start)
            covered += range(start + first, start + length)
            assert first == 0 or first >= seq - min(stride, seq)  # context of at least seq - stride
        assert covered == list(range(n))
