import math

import numpy as np
import pytest
import sentencepiece as spm
import torch
from conftest import SAMPLE, TOKENIZER, tg


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=str(TOKENIZER))


@pytest.fixture(scope="module")
def luts(sp):
    return tg.build_byte_luts(sp, 1024)


def _val_data(tokens, luts):
    return tg.ValData(torch.as_tensor(np.asarray(tokens, dtype=np.int64)), *luts)


def test_byte_count_equals_utf8_bytes_of_decoded_documents(sp, luts):
    """On every real validation document: bpb's byte count == UTF-8 bytes of the decoded text."""
    tokens = tg.read_shard(SAMPLE / "fineweb_val_000000.bin", 1024).astype(np.int64)
    val = _val_data(tokens, luts)
    starts = np.flatnonzero(tokens == 1).tolist() + [len(tokens)]
    assert len(starts) == 201
    total = 0
    for a, b in zip(starts, starts[1:]):
        doc = torch.as_tensor(tokens[a:b])  # [BOS] + pieces
        counted = int(val.target_bytes(doc[:-1], doc[1:]).sum())
        assert counted == len(sp.decode(doc[1:].tolist()).encode("utf-8"))
        total += counted
    assert int(val.target_bytes(val.tokens[:-1], val.tokens[1:]).sum()) == total == 1_489_418


def test_byte_luts_follow_the_challenge_rules(sp, luts):
    base, space, boundary = luts
    assert boundary[[0, 1, 2, 3]].all() and not boundary[4:].any()
    assert base[[0, 1, 2, 3]].tolist() == [0, 0, 0, 0]
    assert base[4:260].tolist() == [1] * 256  # <0xNN> byte-fallback pieces are one byte
    lone = sp.piece_to_id("\u2581")
    assert space[lone] and base[lone] == 0
    x, y = torch.tensor([1, 500]), torch.tensor([lone, lone])
    val = tg.ValData(torch.zeros(2, dtype=torch.long), *luts)
    assert val.target_bytes(x, y).tolist() == [0, 1]  # a leading space after BOS is not counted


class UniformModel(torch.nn.Module):
    """Predicts the uniform distribution: NLL = ln V for every token, whatever the context."""

    def forward(self, x, y):
        return torch.full(y.shape, math.log(1024.0))


@pytest.mark.parametrize("seq_len, world", [(32, 1), (100, 1), (7, 3), (4096, 2), (5000, 1)])
def test_every_token_scored_once_on_any_rank_split(sp, luts, tiny, monkeypatch, seq_len, world):
    tokens = tg.read_shard(SAMPLE / "fineweb_val_000000.bin", 1024)[:3001]
    val = _val_data(tokens, luts)
    h = tiny(eval_seq_len=seq_len, eval_batch_tokens=3 * seq_len)
    monkeypatch.setattr(tg.dist, "all_reduce", lambda t, *a, **k: None)  # sum the ranks by hand below
    per_rank = [tg.evaluate(h, tg.Runtime(rank=r, world_size=world), UniformModel(), val) for r in range(world)]
    n_tokens = sum(r[2] for r in per_rank)
    n_bytes = sum(r[3] for r in per_rank)
    assert n_tokens == 3000
    assert n_bytes == int(val.target_bytes(val.tokens[:-1], val.tokens[1:]).sum())
    if world == 1:
        loss, bpb, _, _ = per_rank[0]
        nll = float(torch.tensor(math.log(1024.0)))  # the float32 value the model returns
        assert loss == pytest.approx(nll, rel=1e-12)
        assert bpb == pytest.approx(3000 * nll / (math.log(2) * n_bytes), rel=1e-12)


def test_evaluate_scores_windows_with_the_model(sp, luts, tiny):
    """Window by window, the summed NLL equals the model's own loss on each window."""
    h = tiny(eval_seq_len=50, eval_batch_tokens=100)
    torch.manual_seed(0)
    model = tg.GPT(h)
    tokens = tg.read_shard(SAMPLE / "fineweb_val_000000.bin", 1024)[:231]
    val = _val_data(tokens, luts)
    loss, _, n, _ = tg.evaluate(h, tg.Runtime(), model, val)
    t = val.tokens
    with torch.no_grad():
        expected = sum(model(t[a:min(a + 50, 230)][None], t[a + 1:min(a + 50, 230) + 1][None]).double().sum()
                       for a in range(0, 230, 50))
    assert n == 230 and loss == pytest.approx(float(expected) / 230, rel=1e-6)
