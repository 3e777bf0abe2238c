"""The frontier model and training (PR #2135 / #1855): recurrence, parallel lanes, gates, Polar Express,
the frontier schedule and context growth."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tg

# A small model with every frontier technique on: 6 layers, 1..2 looped twice more, lanes from layer 5.
SMALL_FRONTIER = dict(preset="frontier", num_layers=6, model_dim=64, num_heads=4, num_kv_heads=2, loop_start=1,
                      loop_end=2, parallel_start=5, train_seq_len=32, eval_seq_len=32, train_batch_tokens=256,
                      grad_accum_steps=1, compile=0, device="cpu", doc_mask=0, lora_chunk=16)


def small(make_settings, **env):
    torch.manual_seed(0)
    h = make_settings(**{**SMALL_FRONTIER, **env})
    model = tg.GPT(h)
    with torch.no_grad():  # away from the init's zeros and ones, so every path matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return h, model


def test_the_frontier_has_the_records_parameter_count(make_settings):
    """#2135 logs 35,945,673 parameters (#1855: 35,945,671); ours allocate the lane mix only for the 3
    layers that use it, 48 fewer."""
    for preset, record in (("frontier", 35_945_673), ("pr1855", 35_945_671)):
        with torch.device("meta"):  # shapes only: no 36M-parameter init
            model = tg.GPT(make_settings(preset=preset))
        n = sum(p.numel() for p in model.parameters())
        assert n == 35_945_625 and abs(n - record) / record < 1e-3
        table = tg.param_table(model)
        assert table["parallel_lanes"] == 3 * 6 and table["unet_skips"] == 2 * 8 * 512
        assert table["sparse_attn_gate"] == 11 * 8 * 12 and table["smear_gate"] == 13


def test_layer_order_of_the_record():
    h = tg.Settings.__new__(tg.Settings)
    h.num_layers, h.loop_start, h.loop_end, h.num_loops, h.unet = 11, 3, 5, 2, True
    assert tg.layer_order(h, True) == ([0, 1, 2, 3, 4, 5, 3, 4], [5, 3, 4, 5, 6, 7, 8, 9, 10])
    assert tg.layer_order(h, False) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10])


def test_looping_reuses_the_same_parameters(make_settings):
    """The switch changes which layers run, never which tensors: the looped layers' modules run 3 times with
    the same weights, every parameter is the same object before and after, and each gets one gradient."""
    h, model = small(make_settings)
    before = [(n, id(p)) for n, p in model.named_parameters()]
    calls = {i: 0 for i in range(h.num_layers)}
    for i, block in enumerate(model.blocks):
        block.attn.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    ids = torch.randint(0, h.vocab_size, (2, 16))
    plain = model(ids, ids).mean()
    assert calls == {i: 1 for i in range(6)}
    model.looping = True
    looped = model(ids, ids).mean()
    assert calls == {0: 2, 1: 4, 2: 4, 3: 2, 4: 2, 5: 2}  # 1 + 1 and 1 + 3 passes
    assert [(n, id(p)) for n, p in model.named_parameters()] == before
    assert not torch.equal(plain, looped)
    looped.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_looped_forward_matches_a_hand_unrolled_reference(make_settings):
    """U-Net skips by decoder position (with gates), lanes from PARALLEL_START, final lane mean."""
    h, model = small(make_settings, parallel_start=0)
    model.looping = True
    ids = torch.randint(0, h.vocab_size, (2, 16))
    x = model.tok_emb(ids)
    x = F.rms_norm(model.smear(x, ids), (h.model_dim,))
    x0, skips = x, []
    encoder, decoder = [0, 1, 2, 1, 2], [1, 2, 3, 4, 5]
    for i in encoder:
        x, _ = model.blocks[i](x, x0)
        skips.append(x)
    for d, i in enumerate(decoder):
        w, g = model.skip_weights[d], torch.sigmoid(model.skip_gates[d])
        x = g * x + (1 - g) * w * skips.pop()
        x, _ = model.blocks[i](x, x0)
    assert torch.allclose(model.hidden(ids), F.rms_norm(x, (h.model_dim,)), atol=1e-5)


def test_parallel_lanes_at_the_identity_mix_are_the_parallel_residual_block(make_settings):
    """With lane_resid = 1 and lane_post = 1 both lanes carry x + A(mix(x, x0)) + M(x): PR #1530's parallel
    residual (attention and MLP read the same stream). The record's lanes cannot reduce to the sequential block
    (x + A, then the MLP reads x + A) because its MLP reads lane 1 before the layer's attention output joins it."""
    h, model = small(make_settings, num_loops=0, parallel_start=4)
    block = model.blocks[4]
    with torch.no_grad():
        block.lane_resid.fill_(1.0)
        block.lane_post.fill_(1.0)
    x, x0 = torch.randn(2, 8, 64), torch.randn(2, 8, 64)
    l0, l1, _ = block.lanes(x, x, x0)
    mix = block.resid_mix
    a = block.attn_scale * block.attn(F.rms_norm(mix[0] * x + mix[1] * x0, (64,)) * block.norm_scale)[0]
    m = block.mlp_scale * block.mlp(F.rms_norm(x, (64,)) * block.norm_scale)
    assert torch.allclose(l0, x + a + m, atol=1e-5) and torch.allclose(l1, l0)
    # Lanes that only keep their own branch: lane 0 is attention-only, lane 1 MLP-only.
    with torch.no_grad():
        block.lane_post.copy_(torch.eye(2))
    l0, l1, _ = block.lanes(x, x, x0)
    assert torch.allclose(l0, x + a, atol=1e-5) and torch.allclose(l1, x + m, atol=1e-5)
    # PARALLEL_START=0 is the plain sequential stack.
    h2, seq = small(make_settings, num_loops=0, parallel_start=0)
    ids = torch.randint(0, h.vocab_size, (2, 16))
    x = F.rms_norm(seq.smear(seq.tok_emb(ids), ids), (64,))
    x0, skips = x, []
    for i in range(6):
        if i >= 3 and skips:
            g = torch.sigmoid(seq.skip_gates[i - 3])
            x = g * x + (1 - g) * seq.skip_weights[i - 3] * skips.pop()
        x, _ = seq.blocks[i](x, x0)
        if i < 3:
            skips.append(x)
    assert torch.allclose(seq.hidden(ids), F.rms_norm(x, (64,)), atol=1e-5)


def test_sparse_attention_gate_and_windowed_smear(make_settings):
    """SparseAttnGate: head h's output times σ(0.5·W_h·u[:12]), 0.5 at init; SmearGate with a window:
    e_t + λσ(w·e_t[:12])e_{t-1}, the identity at init, and nothing from the previous document at a BOS."""
    h = make_settings(**{**SMALL_FRONTIER, "smear_doc_reset": 1})
    model = tg.GPT(h)
    attn = model.blocks[0].attn
    assert attn.gate_w.shape == (4, 12) and not attn.gate_w.any()
    seen = []
    attn.proj.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].view(1, 5, 4, 16)))
    u = torch.randn(1, 5, 64)
    gate_w, attn.gate_w = attn.gate_w, None
    attn(u)
    attn.gate_w = gate_w
    attn(u)
    assert torch.allclose(seen[1], 0.5 * seen[0])  # σ(0) at init
    with torch.no_grad():
        attn.gate_w.normal_()
    attn(u)
    assert torch.allclose(seen[2], torch.sigmoid(0.5 * u[..., :12] @ attn.gate_w.T)[..., None] * seen[0], atol=1e-6)
    e, ids = torch.randn(1, 4, 64), torch.tensor([[5, 6, tg.BOS_ID, 7]])
    assert torch.equal(model.smear(e, ids), e)  # λ = 0
    with torch.no_grad():
        model.smear.lam.fill_(2.0)
        model.smear.gate.normal_()
    out = model.smear(e, ids)
    g = 2.0 * torch.sigmoid(e[0, :, :12] @ model.smear.gate)
    assert torch.allclose(out[0, 1], e[0, 1] + g[1] * e[0, 0]) and torch.equal(out[0, 0], e[0, 0])
    assert torch.equal(out[0, 2], e[0, 2])  # the BOS takes nothing from the document before it


def test_asym_logit_softcap(make_settings):
    model = tg.GPT(make_settings(**SMALL_FRONTIER))
    with torch.no_grad():
        model.softcap_pos.fill_(20.0)
        model.softcap_neg.fill_(40.0)
    x = torch.randn(3, 64)
    raw = x @ model.tok_emb.weight.T
    expect = torch.where(raw >= 0, 20 * torch.tanh(raw / 20), 40 * torch.tanh(raw / 40))
    assert torch.allclose(model.head(x), expect, atol=1e-5)


def _orthogonality_error(X):
    s = torch.linalg.svdvals(X.double())
    return float((s - 1).abs().max())


def test_polar_express_orthogonalizes_at_least_as_well_as_the_quintic(make_settings):
    """Measured on random matrices of the shapes Muon sees: the largest |σ - 1| after 5 steps."""
    torch.manual_seed(0)
    for shape in ((64, 64), (128, 64), (64, 256), (512, 512)):
        for _ in range(3):
            G = torch.randn(shape)
            quintic = _orthogonality_error(tg.zeropower_via_newtonschulz5(G, 5))
            polar = _orthogonality_error(tg.zeropower_via_newtonschulz5(G, 5, polar=True))
            assert polar <= quintic, (shape, polar, quintic)
    with pytest.raises(tg.SettingsError, match="MUON_BACKEND_STEPS=6 must be at most"):
        make_settings(muon_ns="polar", muon_backend_steps=6)


def test_row_normalized_muon_step_matches_the_formula(make_settings):
    """MuonEq-R: the Nesterov update's rows are unit-normed before Newton-Schulz."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 128))
    p.grad = torch.randn(64, 128)
    start = p.detach().clone()
    muon = tg.Muon([p], lr=0.1, momentum=0.9, backend_steps=5, weight_decay=0.0, rt=tg.Runtime(), parallel=False,
                   polar=True, row_norm=True)
    muon.prepare()
    muon.finish()
    muon.step()
    u = p.grad + 0.9 * p.grad  # momentum buffer = g, Nesterov g + 0.9 buf
    u = u / u.norm(dim=-1, keepdim=True)
    expect = start - 0.1 * tg.zeropower_via_newtonschulz5(u, 5, polar=True)
    assert torch.allclose(p.detach(), expect, atol=1e-5)


def test_context_growth_hands_the_loader_each_length(tiny, small_data):
    """TRAIN_SEQ_SCHEDULE=16@0.25,32@0.5,64@1 over 8 steps: 16 up to 25%, then 32, then 64, with an LR
    ramp after each change, and the loader's batches have that length."""
    h = tiny(data_path=str(small_data), iterations=8, max_wallclock_seconds=0, train_seq_schedule="16@0.25,32@0.5,64@1",
             seq_change_warmup_steps=2, train_batch_tokens=256)
    trainer = tg.Trainer(h, tg.Runtime(), tg.GPT(h), val=None)
    seen = []
    next_batch = trainer.loader.next_batch
    trainer.loader.next_batch = lambda: (b := next_batch(), seen.append(tuple(b[0].shape)))[0]
    lrs = []
    for s in range(8):
        trainer.step(s, 0.0)
        lrs.append(trainer.optimizers[1].param_groups[0]["lr"] / h.matrix_lr)
    assert seen == [(16, 16)] * 3 + [(8, 32)] * 2 + [(4, 64)] * 3
    assert lrs[3] == pytest.approx(0.5 * tg.lr_scale(h, 3, 0.0)) and lrs[4] == pytest.approx(tg.lr_scale(h, 4, 0.0))
    assert [tg.seq_len_at(h, f) for f in (0, 0.25, 0.26, 0.5, 0.9, 1.0)] == [16, 16, 32, 32, 64, 64]
    with pytest.raises(tg.SettingsError, match="whole 48-token sequences"):
        tg.resolve_grad_accum(tiny(train_seq_schedule="16@0.5,48@1"), tg.Runtime())
    for bad in ("16@0.5,32@0.4,64@1", "16@0.5", "x@1"):
        with pytest.raises(tg.SettingsError, match="TRAIN_SEQ_SCHEDULE"):
            tiny(train_seq_schedule=bad)


def test_warmup_compiles_every_training_state_and_the_switch_happens_on_time(tiny, small_data):
    """Recurrence and context growth: the warm-up runs each (length, looping) state once, then restores the
    start; the run switches looping on at LOOP_AT."""
    h = tiny(data_path=str(small_data), iterations=10, max_wallclock_seconds=0, num_layers=4, num_loops=1,
             loop_start=1, loop_end=2, loop_at=0.3, train_seq_schedule="16@0.5,32@1", warmup_steps=1, qat_threshold=0)
    trainer = tg.Trainer(h, tg.Runtime(), tg.GPT(h), val=None)
    states = []
    step = trainer.step
    trainer.step = lambda s, ms, warm=False: (loss := step(s, ms, warm), states.append(
        (trainer.loader.seq_len, trainer.model.looping)))[0]
    trainer.warmup()
    assert states == [(16, False), (16, True), (32, False), (32, True)]
    assert not trainer.model.looping and trainer.loader.seq_len == 16
    states.clear()
    for s in range(10):
        trainer.step(s, 0.0)
    assert [loop for _, loop in states] == [False] * 3 + [True] * 7
    assert tg.expected_graphs(h, frozen=False)[:6] == ["train_16", "train_16_loop", "train_32", "train_32_loop",
                                                       "eval", "eval_loop"]


@pytest.mark.parametrize("setting,value", [("loop_end", 11), ("parallel_start", 4), ("parallel_start", 12),
                                           ("smear_window", 600), ("muon_ns", "cubic")])
def test_bad_frontier_settings_fail_with_one_line(make_settings, setting, value):
    with pytest.raises(tg.SettingsError) as e:
        make_settings(preset="frontier", **{setting: value})
    assert "\n" not in str(e.value) and setting.upper() in str(e.value)


def test_asym_logit_caps_learn_without_weight_decay(make_settings):
    """The caps are in the scalar AdamW at SCALAR_LR but never decay: with zero gradient they stay at 30."""
    h = make_settings(**SMALL_FRONTIER)
    model = tg.GPT(h)
    adam = tg.build_optimizers(h, tg.Runtime(), model)[0]
    group = next(g for g in adam.param_groups if any(p is model.softcap_pos for p in g["params"]))
    assert group["weight_decay"] == 0.0 and group["lr"] == h.scalar_lr and len(group["params"]) == 2
    assert all(g["weight_decay"] > 0 for g in adam.param_groups if g is not group)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for _ in range(10):
        adam.step()
    assert model.softcap_pos.item() == model.softcap_neg.item() == 30.0
