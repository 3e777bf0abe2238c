import math

import pytest
import torch
from conftest import tg


def test_forward_backward_at_init(tiny):
    h = tiny()
    torch.manual_seed(0)
    model = tg.GPT(h)
    x = torch.randint(0, 1024, (2, 32))
    nll = model(x, torch.roll(x, -1, 1))
    assert nll.shape == (2, 32)
    assert nll.mean().item() == pytest.approx(math.log(1024), abs=0.05)  # near-uniform at init
    nll.mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["tok_emb.weight"].abs().sum() > 0


def test_output_projections_start_at_zero(tiny):
    model = tg.GPT(tiny())
    for block in model.blocks:
        assert block.attn.proj.weight.abs().sum() == 0 and block.mlp.proj.weight.abs().sum() == 0
    assert model.bigram.table.weight.abs().sum() == 0


def test_logits_are_causal(tiny):
    h = tiny(num_kv_heads=4)
    torch.manual_seed(0)
    model = tg.GPT(h)
    for p in model.parameters():  # zero-init projections would hide a leak
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randint(0, 1024, (1, 32))
    for t in (0, 7, 31):
        y = x.clone()
        y[:, t + 1:] = torch.randint(0, 1024, (1, 31 - t))
        assert torch.allclose(model.logits(x)[:, :t + 1], model.logits(y)[:, :t + 1], atol=1e-6)


def test_softcap_bounds_logits(tiny):
    model = tg.GPT(tiny(logit_softcap=5))
    torch.nn.init.normal_(model.tok_emb.weight, std=10.0)
    assert model.logits(torch.randint(0, 1024, (1, 32))).abs().max() <= 5.0


@pytest.mark.parametrize("rows, cols", [(64, 64), (128, 32), (32, 96)])
def test_newton_schulz_is_near_orthogonal(rows, cols):
    torch.manual_seed(0)
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, k))
    v, _ = torch.linalg.qr(torch.randn(cols, k))
    spectrum = torch.linspace(0.1, 1.0, k) * 37.0  # any scale: the input is normalized first
    out = tg.zeropower_via_newtonschulz5(u @ torch.diag(spectrum) @ v.T, steps=5)
    s = torch.linalg.svdvals(out)
    # Five quintic steps map every singular value into a band around 1 (they do not reach 1 exactly).
    assert s.min() > 0.6 and s.max() < 1.25
    inner = u.T @ out @ v  # singular vectors are kept: only the spectrum changes
    assert torch.allclose(inner, torch.diag(torch.diagonal(inner)), atol=1e-4)


def test_muon_step_matches_its_definition():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(32, 16))
    p0, g = p.detach().clone(), torch.randn(32, 16)
    p.grad = g.clone()
    opt = tg.Muon([p], lr=0.1, momentum=0.9, backend_steps=5, weight_decay=0.5, rt=tg.Runtime(), parallel=False)
    opt.prepare()
    opt.finish()
    opt.step()
    nesterov = g + 0.9 * g  # buf = g after one step; update uses g + momentum * buf
    expected = p0 * (1 - 0.1 * 0.5) - 0.1 * math.sqrt(2) * tg.zeropower_via_newtonschulz5(nesterov, 5)
    assert torch.allclose(p.detach(), expected, atol=1e-6)


def test_training_steps_reduce_the_loss(tiny, small_data):
    h = tiny(data_path=str(small_data), iterations=30, max_wallclock_seconds=0, warmdown_iters=0, qat_threshold=0)
    torch.manual_seed(0)
    model = tg.GPT(h)
    trainer = tg.Trainer(h, tg.Runtime(), model, val=None)
    losses = [trainer.step(s, 0.0).item() for s in range(30)]
    assert losses[-1] < losses[0] - 1.0


def test_schedules(make_settings):
    h = make_settings(warmdown_iters=100, iterations=1000, max_wallclock_seconds=0, muon_momentum=0.95,
                      muon_momentum_warmup_start=0.85, muon_momentum_warmup_steps=500)
    assert tg.lr_scale(h, 0, 0) == 1.0 and tg.lr_scale(h, 900, 0) == 1.0
    assert tg.lr_scale(h, 950, 0) == pytest.approx(0.5) and tg.lr_scale(h, 1000, 0) == 0.0
    h.max_wallclock_seconds = 10.0  # 10 s budget, 10 ms per step -> warmdown is the last 1 s
    assert tg.lr_scale(h, 100, 1000.0) == 1.0
    assert tg.lr_scale(h, 950, 9500.0) == pytest.approx(0.5)
    assert tg.muon_momentum_at(h, 0) == pytest.approx(0.85)
    assert tg.muon_momentum_at(h, 250) == pytest.approx(0.90)
    assert tg.muon_momentum_at(h, 5000) == pytest.approx(0.95)


# The frontier's model at tiny size: looped layers (a cache per pass), lanes, windowed SmearGate, gates.
FRONTIER_TINY = dict(preset="frontier", vocab_size=1024, num_layers=4, loop_start=1, loop_end=2, parallel_start=3,
                     smear_doc_reset=1, lora_chunk=16)


@pytest.mark.parametrize("extra,looping", [({}, False), (dict(attn_gate=1, value_residual=1, num_kv_heads=4, xsa_last_n=1),
                                                          False), (FRONTIER_TINY, True)])
def test_kv_cache_decoding_equals_the_full_forward(tiny, extra, looping):
    """Token-by-token decoding (self-generated calibration) gives the full forward's logits, BOS resets included."""
    h = tiny(**extra)
    torch.manual_seed(0)
    model = tg.GPT(h)
    model.looping = looping
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    model.eval()
    x = torch.randint(0, 1024, (3, 20))
    x[:, 9] = tg.BOS_ID
    full = model.logits(x)
    cache = tg.KVCache(20)
    steps = torch.cat([model.head(model.hidden(x[:, t:t + 1], cache)) for t in range(20)], dim=1)
    assert torch.allclose(steps, full, atol=1e-5)
