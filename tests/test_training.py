"""Schedules, weight averaging and quantization-aware training."""

import pytest
import torch
from conftest import tg


def test_lr_schedule_shapes(make_settings):
    h = make_settings(iterations=1000, warmdown_iters=200, max_wallclock_seconds=0, lr_schedule="cosine",
                      lr_warmup_steps=10, min_lr=0.1)
    assert tg.lr_scale(h, 0, 0) == pytest.approx(0.1)  # warmup: (step+1)/10
    assert tg.lr_scale(h, 9, 0) == pytest.approx(1.0) and tg.lr_scale(h, 500, 0) == pytest.approx(1.0)
    assert tg.lr_scale(h, 900, 0) == pytest.approx(0.5)  # cosine half-way
    assert tg.lr_scale(h, 990, 0) == pytest.approx(0.1)  # MIN_LR floors the scale (cosine is ~0.006 here)
    assert tg.lr_scale(h, 1000, 0) == pytest.approx(0.1)
    h.lr_schedule = "linear"
    assert tg.lr_scale(h, 850, 0) == pytest.approx(0.75)


def test_warmdown_fraction_is_the_frontier_schedule(make_settings):
    """WARMDOWN_FRAC=0.85, MIN_LR=0.1: 1 for the first 15% of the budget, then max((1 - f) / 0.85, 0.1)."""
    h = make_settings(max_wallclock_seconds=100, warmdown_frac=0.85, min_lr=0.1)
    for f in (0.0, 0.1, 0.15, 0.5, 0.9, 0.95, 1.0):
        assert tg.decay_scale(h, 10, 100_000 * f) == pytest.approx(max(min(1.0, (1 - f) / 0.85), 0.1))
    h = make_settings(max_wallclock_seconds=0, iterations=200, warmdown_frac=0.5)  # no cap: fraction of steps
    assert tg.decay_scale(h, 100, 0) == pytest.approx(1.0) and tg.decay_scale(h, 150, 0) == pytest.approx(0.5)


def test_gptq_reserve_comes_out_of_the_training_budget(make_settings):
    h = make_settings(max_wallclock_seconds=100, gptq_reserve_seconds=20, warmdown_iters=100, min_lr=0)
    assert tg.train_cap_ms(h) == 80_000
    # 100 steps in 40 s: 400 ms/step, so the warmdown is the last 40 s before the 80 s cap
    assert tg.decay_scale(h, 100, 40_000) == pytest.approx(1.0)
    assert tg.decay_scale(h, 150, 60_000) == pytest.approx(0.5)
    with pytest.raises(tg.SettingsError, match="GPTQ_RESERVE_SECONDS=600.0 leaves no training time"):
        make_settings(gptq_reserve_seconds=600)


def test_ema_and_swa_arithmetic(make_settings):
    h = make_settings(ema_decay=0.9, swa_every=2, swa_start=0.5, final_weights="ema")
    p = torch.nn.Parameter(torch.zeros(3))
    avg = tg.WeightAverager(h, torch.nn.ParameterList([p]))
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    scales = [1.0, 0.6, 0.4, 0.3, 0.2]  # the LR scale after each step
    for step, (v, scale) in enumerate(zip(values, scales), 1):
        with torch.no_grad():
            p.fill_(v)
        avg.update(step, scale)
    ema = 0.0
    for v in values:
        ema = 0.9 * ema + 0.1 * v
    assert torch.allclose(avg.ema[0], torch.full((3,), ema))
    assert avg.swa_count == 1  # step 4 only: step 2 was above SWA_START, 3 and 5 off the period
    assert avg.final()[0] == "ema" and torch.allclose(avg.final()[1][0], torch.full((3,), ema))
    h.final_weights = "swa"
    assert avg.final()[0] == "swa" and torch.equal(avg.final()[1][0], torch.full((3,), 4.0))
    h.final_weights, h.blend_ema = "blend", 0.25
    assert torch.allclose(avg.final()[1][0], torch.full((3,), 0.25 * ema + 0.75 * 4.0))
    h.final_weights = "live"
    assert avg.final() == ("live", None)
    name = tg.WeightAverager(h, torch.nn.ParameterList([p])).apply_final()
    assert name == "live" and torch.equal(p.detach(), torch.full((3,), 5.0))


def test_missing_average_falls_back_and_says_so(make_settings):
    h = make_settings(ema_decay=0, swa_every=0, final_weights="swa")
    assert tg.WeightAverager(h, torch.nn.Linear(2, 2)).final() == ("live", None)


def test_averaged_weights_are_applied(make_settings):
    h = make_settings(ema_decay=0.5, swa_every=0)
    lin = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        lin.weight.fill_(0.0)
    avg = tg.WeightAverager(h, lin)
    with torch.no_grad():
        lin.weight.fill_(2.0)
    avg.update(1, 1.0)
    assert avg.apply_final() == "ema" and torch.equal(lin.weight.detach(), torch.full((2, 2), 1.0))


@pytest.mark.parametrize("bits", [4, 5, 6])
def test_fake_quantization_is_the_export_grid(tiny, bits):
    """What QAT trains on is, value for value, what the artifact stores."""
    h = tiny(quant_bits_mlp=bits, quant_bits_attn=bits, quant_method="rtn", quant_clip_mlp="absmax",
             quant_clip_attn="absmax", quant_min_numel=0)
    torch.manual_seed(0)
    model = tg.GPT(h)
    state = model.state_dict()
    q = tg.quantize_model(h, state, {})
    exported = tg.deserialize_artifact(tg.pack_artifact(q, tg.encode_all(h, q)))
    for name, module in model.named_modules():
        if isinstance(module, tg.QATLinear) and module.bits and name + ".weight" in tg.export_bits(h, state):
            assert torch.equal(tg.fake_quantize(module.weight, bits).detach(), exported[name + ".weight"])
    w = torch.randn(8, 16, requires_grad=True)
    tg.fake_quantize(w, bits).sum().backward()
    assert torch.equal(w.grad, torch.ones(8, 16))  # straight-through gradient


def test_qat_really_changes_the_compiled_forward(tiny):
    """Switching QAT on selects a compiled graph that runs on fake-quantized weights (not folded away)."""
    h = tiny(quant_bits_mlp=4, quant_bits_attn=4)
    torch.manual_seed(0)
    model = tg.GPT(h)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    reference = tg.GPT(h)
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        for m in reference.modules():
            if isinstance(m, tg.QATLinear):
                m.weight.copy_(tg.fake_quantize(m.weight, 4))
    compiled = torch.compile(model, fullgraph=True)
    ids = torch.randint(0, 1024, (2, 32))
    off = compiled(ids, ids).detach()
    tol = 2e-3  # compiled CPU kernels fuse and reorder sums: per-token NLL differs by up to ~6e-4 from eager
    assert torch.allclose(off, model(ids, ids), atol=tol)
    tg.set_qat(model, True)
    on = compiled(ids, ids).detach()
    assert torch.allclose(on, reference(ids, ids), atol=tol)
    assert (on - off).abs().max() > 5 * tol  # the int4 effect (~0.03 here) is well above that noise
    tg.set_qat(model, False)
    assert torch.equal(compiled(ids, ids), off)


def test_qat_starts_at_the_threshold(tiny, small_data):
    h = tiny(data_path=str(small_data), iterations=100, max_wallclock_seconds=0, warmdown_iters=50,
             qat_threshold=0.5)
    trainer = tg.Trainer(h, tg.Runtime(), tg.GPT(h), val=None)
    trainer.maybe_start_qat(74, 0.0)  # decay 0.52
    assert not trainer.qat_on and all(m.qat_bits == 0 for m in trainer.model.modules()
                                      if isinstance(m, tg.QATLinear))
    trainer.maybe_start_qat(76, 0.0)  # decay 0.48
    assert trainer.qat_on and all(m.qat_bits == m.bits for m in trainer.model.modules() if isinstance(m, tg.QATLinear))
    assert {m.qat_bits for m in trainer.model.modules() if isinstance(m, tg.QATLinear)} == {0, 5}  # tables: off
    h2 = tiny(data_path=str(small_data), iterations=100, max_wallclock_seconds=0, qat_start_frac=0.3)
    t2 = tg.Trainer(h2, tg.Runtime(), tg.GPT(h2), val=None)
    t2.maybe_start_qat(29, 0.0)
    assert not t2.qat_on
    t2.maybe_start_qat(30, 0.0)
    assert t2.qat_on


def _trainer(h):
    torch.manual_seed(0)
    return tg.Trainer(h, tg.Runtime(), tg.GPT(h), val=None)


@pytest.mark.parametrize("order", ["stream", "coprime"])
def test_resume_equals_the_uninterrupted_run(tiny, small_data, tmp_path, order):
    h = tiny(data_path=str(small_data), iterations=8, max_wallclock_seconds=0, warmdown_iters=4, qat_threshold=0.5,
             ema_decay=0.9, swa_every=1, swa_start=1.0, grad_clip_norm=0.3, data_order=order)
    whole = _trainer(h)
    for s in range(8):
        whole.step(s, 0.0)
    first = _trainer(h)
    for s in range(4):
        first.step(s, 0.0)
    first.save_checkpoint(tmp_path / "run.ckpt", 4, 1234.0)
    assert not (tmp_path / "run.ckpt.tmp").exists()
    resumed = _trainer(h)
    resumed.load_checkpoint(str(tmp_path / "run.ckpt"))
    assert (resumed.start_step, resumed.start_ms) == (4, 1234.0)
    for s in range(4, 8):
        resumed.step(s, 0.0)
    assert whole.qat_on and resumed.qat_on
    for a, b in zip(whole.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(whole.averager.ema + whole.averager.swa, resumed.averager.ema + resumed.averager.swa):
        assert torch.equal(a, b)


def test_resume_refuses_a_checkpoint_of_another_model(tiny, small_data, tmp_path):
    h = tiny(data_path=str(small_data))
    _trainer(h).save_checkpoint(tmp_path / "run.ckpt", 0, 0.0)
    other = _trainer(tiny(data_path=str(small_data), num_layers=3))
    with pytest.raises(tg.SettingsError, match="does not match this model's settings"):
        other.load_checkpoint(str(tmp_path / "run.ckpt"))
    with pytest.raises(tg.SettingsError, match="does not exist"):
        other.load_checkpoint(str(tmp_path / "missing.ckpt"))
    (tmp_path / "cut.ckpt").write_bytes((tmp_path / "run.ckpt").read_bytes()[:1000])
    with pytest.raises(tg.SettingsError, match="is not a readable checkpoint"):
        other.load_checkpoint(str(tmp_path / "cut.ckpt"))


def test_muon_banks_match_per_matrix_updates():
    """Batched (banked) Newton-Schulz gives each matrix the update it gets alone."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(32, 16)) for _ in range(3)] + [torch.nn.Parameter(torch.randn(8, 8))]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, c in zip(params, copies):
        p.grad = torch.randn_like(p)
        c.grad = p.grad.clone()
    banked = tg.Muon(params, lr=0.1, momentum=0.9, backend_steps=5, weight_decay=0.1, rt=tg.Runtime(), parallel=False)
    assert sorted(len(b) for b in banked.banks) == [1, 3]
    banked.prepare()
    banked.finish()
    banked.step()
    for c in copies:
        single = tg.Muon([c], lr=0.1, momentum=0.9, backend_steps=5, weight_decay=0.1, rt=tg.Runtime(), parallel=False)
        single.prepare()
        single.finish()
        single.step()
    for p, c in zip(params, copies):
        assert torch.allclose(p, c, atol=1e-6)
