"""Each architecture technique: its defining property, its neutral form, and causality of every preset."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, tg

BOS = tg.BOS_ID


def randomize(model, std=0.05):
    """Zero-init tables and projections would hide leaks and cancel effects: give every weight a value."""
    torch.manual_seed(1)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=std)
    return model


def reference_attention(q, k, v, allowed):
    """softmax(q k^T / sqrt(d)) v over (B, T, H, D) with GQA by repetition; allowed: (B, T, T) bool."""
    rep = q.size(2) // k.size(2)
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.size(-1))
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v)


def doc_ids_batch():
    ids = torch.randint(4, 1024, (2, 24))
    ids[0, [0, 5, 6, 17]] = BOS  # documents of 5, 1, 11 and 7 tokens
    ids[1, [9]] = BOS  # the row starts inside a document
    return ids


def allowed_mask(ids):
    T = ids.size(1)
    doc = torch.cumsum(ids == BOS, 1)
    return torch.ones(T, T, dtype=torch.bool).tril() & (doc[:, :, None] == doc[:, None, :])


@pytest.mark.parametrize("heads, kv", [(4, 4), (4, 2), (4, 1)])
def test_sdpa_paths_match_reference_attention(heads, kv):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 24, heads, 16), torch.randn(2, 24, kv, 16), torch.randn(2, 24, kv, 16)
    causal = torch.ones(24, 24, dtype=torch.bool).tril().expand(2, 24, 24)
    assert torch.allclose(tg.attend(q, k, v, None, fa3=False, max_docs=0), reference_attention(q, k, v, causal), atol=1e-5)
    ids = doc_ids_batch()
    masked = tg.attend(q, k, v, ids, fa3=False, max_docs=8)
    assert torch.allclose(masked, reference_attention(q, k, v, allowed_mask(ids)), atol=1e-5)
    capped = ids.clone()
    capped[1, 9] = 7  # with a cap of 3 documents the batch's 4th inner BOS is not a boundary
    assert torch.allclose(tg.attend(q, k, v, ids, fa3=False, max_docs=3),
                          reference_attention(q, k, v, allowed_mask(capped)), atol=1e-5)


def test_xsa_output_has_no_component_along_own_value():
    torch.manual_seed(0)
    y, v = torch.randn(2, 8, 4, 16), torch.randn(2, 8, 2, 16)
    out = tg.exclusive_self_attention(y, v)
    own = F.normalize(v, dim=-1).repeat_interleave(2, dim=2)  # query heads 0,1 share KV head 0
    assert (out * own).sum(-1).abs().max() < 1e-5
    assert torch.allclose(out + (y * own).sum(-1, keepdim=True) * own, y, atol=1e-5)  # nothing else removed


def test_xsa_layers(tiny):
    model = tg.GPT(tiny(num_layers=4, xsa_last_n=2))
    assert [b.attn.xsa for b in model.blocks] == [False, False, True, True]


def test_smear_gate(tiny):
    smear = tg.SmearGate(tiny(smear_doc_reset=0))
    x, ids = torch.randn(1, 6, 64), torch.tensor([[BOS, 7, 8, BOS, 9, 10]])
    prev = F.pad(x[:, :-1], (0, 0, 1, 0))
    assert torch.allclose(smear(x, ids), 0.5 * x + 0.5 * prev, atol=1e-6)  # gate 0: σ = 0.5 blend at init
    with torch.no_grad():
        smear.gate.fill_(-1e4)  # σ(gate) = 0: a zero gate is the identity
    assert torch.equal(smear(x, ids), x)
    reset = tg.SmearGate(tiny(smear_doc_reset=1))
    out = reset(x, ids)
    assert torch.allclose(out[:, [0, 3]], 0.5 * x[:, [0, 3]], atol=1e-6)  # nothing smears into a BOS
    assert torch.allclose(out[:, [1, 2, 4, 5]], 0.5 * x[:, [1, 2, 4, 5]] + 0.5 * x[:, [0, 1, 3, 4]], atol=1e-6)


def test_bigram_hash_buckets(tiny):
    big = tg.BigramHash(tiny(bigram_buckets=100, bigram_doc_reset=1))
    ids = torch.tensor([[5, 6, BOS, 7, 8], [BOS, 3, 4, 5, 6]])
    b = big.bucket(ids)
    assert b[0, 0] == 99 and b[0, 2] == 99 and b[1, 0] == 99  # reserved: position 0 and at BOS
    assert b[0, 1] == (36313 * 6 ^ 27191 * 5) % 99 and b[0, 3] == (36313 * 7 ^ 27191 * BOS) % 99
    assert (b[:, 1:][ids[:, 1:] != BOS] < 99).all()
    no_reset = tg.BigramHash(tiny(bigram_buckets=100, bigram_doc_reset=0)).bucket(ids)
    assert no_reset[0, 2] == (36313 * BOS ^ 27191 * 6) % 99
    assert big(ids).abs().sum() == 0  # zero-init table: no effect at init


def test_partial_rope_leaves_other_dims_untouched():
    rope = tg.Rotary(16, 10000.0)
    x = torch.randn(2, 10, 4, 64)
    out = rope(x)
    assert torch.equal(out[..., 16:], x[..., 16:])
    assert torch.allclose(out[..., :16].norm(dim=-1), x[..., :16].norm(dim=-1), atol=1e-5)  # a rotation
    assert torch.allclose(out[:, 0], x[:, 0])  # position 0: angle 0
    full = tg.Rotary(64, 10000.0)(x)
    assert not torch.allclose(full[..., 16:], x[..., 16:])


def test_rope_base_does_not_change_with_length():
    rope = tg.Rotary(16, 22082.0)
    x = torch.randn(1, 4096, 1, 16)
    assert torch.allclose(rope(x)[:, :1024], rope(x[:, :1024]), atol=1e-5)


def test_gates_and_value_residual_are_neutral_at_init(tiny):
    """Gated attention and value residual at their init give exactly the plain model's logits."""
    torch.manual_seed(0)
    plain = tg.GPT(tiny(num_layers=3, attn_gate=0, value_residual=0))
    randomize(plain)
    gated = tg.GPT(tiny(num_layers=3, attn_gate=1, value_residual=1))
    missing, unexpected = gated.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and all(".gate." in k or "vr_lambda" in k for k in missing)
    x = torch.randint(0, 1024, (2, 16))
    assert torch.allclose(gated.logits(x), plain.logits(x), atol=1e-6)
    with torch.no_grad():
        gated.blocks[2].attn.vr_lambda.fill_(0.5)
    assert not torch.allclose(gated.logits(x), plain.logits(x), atol=1e-4)


def test_value_embedding_layers_and_ln_scale(tiny):
    model = tg.GPT(tiny(num_layers=5, ve_layers="-2,1"))
    assert model.ve_layers == [1, 3]
    assert [round(b.norm_scale, 4) for b in model.blocks] == [1.0, 0.7071, 0.5774, 0.5, 0.4472]
    assert [b.norm_scale for b in tg.GPT(tiny(num_layers=3, ln_scale=0)).blocks] == [1.0] * 3
    assert model.n_skips == 2 and model.skip_weights.shape == (2, 64)


def test_document_masking_blocks_earlier_documents_in_training_only(tiny):
    model = randomize(tg.GPT(tiny(doc_mask=1, bigram_doc_reset=1, smear_doc_reset=1)))
    ids = torch.randint(4, 1024, (1, 32))
    ids[0, 12] = BOS
    other = ids.clone()
    other[0, :12] = torch.randint(4, 1024, (12,))  # change only the previous document
    model.train()
    assert torch.allclose(model.logits(ids)[:, 12:], model.logits(other)[:, 12:], atol=1e-5)
    model.eval()  # evaluation attends across documents
    assert not torch.allclose(model.logits(ids)[:, 12:], model.logits(other)[:, 12:], atol=1e-5)


@pytest.mark.parametrize("preset", list(tg.PRESETS))
def test_every_preset_is_causal(make_settings, preset):
    h = make_settings(preset=preset, device="cpu")
    torch.manual_seed(0)
    model = randomize(tg.GPT(h), std=0.02)
    ids = torch.randint(0, h.vocab_size, (1, 48))
    ids[0, [0, 20]] = BOS
    for training in (True, False):
        model.train(training)
        with torch.no_grad():
            base = model.logits(ids)
            for p in (0, 19, 20, 33, 46):
                changed = ids.clone()
                changed[0, p + 1:] = torch.randint(0, h.vocab_size, (47 - p,))
                assert torch.allclose(model.logits(changed)[:, :p + 1], base[:, :p + 1], atol=1e-5), (preset, p)


EXPECTED_PARAMS = {  # the records' logged counts for the same architectures
    "baseline": 17_059_912,  # the naive baseline
    "pr585": 33_580_124,  # PR #585's logs (model_params:33580124)
    "pr578": 26_993_756,  # 11L 8/4 MLP3x BigramHash 2048, as R0322
    "pr1319": 27_067_484,  # PR #1019's architecture
}


def test_parameter_counts_of_presets(make_settings):
    counts = {p: sum(x.numel() for x in tg.GPT(make_settings(preset=p)).parameters()) for p in tg.PRESETS}
    assert abs(counts["pr585"] - 33.6e6) / 33.6e6 < 0.01  # PR #585's write-up: 33.6M
    for preset, expected in EXPECTED_PARAMS.items():
        assert counts[preset] == expected


def test_parameter_table_adds_up(tiny):
    model = tg.GPT(tiny(attn_gate=1, value_residual=1))
    table = tg.param_table(model)
    assert sum(table.values()) == sum(p.numel() for p in model.parameters())
    assert set(table) == {"embedding", "bigram_hash", "smear_gate", "value_embed", "attention", "attn_gate",
                          "value_residual", "mlp", "block_scalars", "unet_skips"}


def test_compiled_model_matches_eager_on_cpu(tiny):
    h = tiny(attn_gate=1, value_residual=1, doc_mask=1)
    model = randomize(tg.GPT(h))
    compiled = torch.compile(model, fullgraph=True)
    ids = torch.randint(0, 1024, (2, 32))
    ids[0, 9] = BOS
    eager = model(ids, torch.roll(ids, -1, 1))
    fast = compiled(ids, torch.roll(ids, -1, 1))
    assert torch.allclose(fast, eager, atol=1e-4)
    fast.mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_plan_prints_the_table_without_data(tmp_path, make_settings):
    env = {"PATH": os.environ["PATH"], "PLAN": "1", "PRESET": "pr1683", "DATA_PATH": str(tmp_path / "none"),
           "TOKENIZER_PATH": str(tmp_path / "none.model")}
    proc = subprocess.run([sys.executable, "train_gpt.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "params component:attn_gate count:" in proc.stdout and "model_params:" in proc.stdout
    count = int(proc.stdout.split("model_params:")[1].split()[0])
    assert count == sum(p.numel() for p in tg.GPT(make_settings(preset="pr1683")).parameters())
