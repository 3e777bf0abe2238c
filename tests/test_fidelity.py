"""The record presets compute what the records' own scripts computed: facts read from their code, pinned
as constants and small hand-computed cases (PR #585 unless named)."""
import math

import pytest
import torch
from conftest import tg

BOS = tg.BOS_ID
RECORD_PRESETS = ("pr585", "pr592", "pr578", "pr1319")


def test_record_presets_set_what_the_records_computed(make_settings):
    h = make_settings(preset="pr585")
    assert (h.bigram_doc_reset, h.smear_doc_reset, h.table_proj_scale, h.table_dtype) == (False, False, True, "bf16")
    assert (h.qat_clip_pct, h.qat_min_clip, h.qat_full_range, h.qat_table_bits) == (0.9995, 1.0, True, 5)
    assert (h.ttt_blocks, h.ttt_train, h.ttt_beta2, h.ttt_batch_seqs) == (2, "scale", 0.999, 256)
    assert (h.prune_magnitude, h.prune_fraction) == (0.02, 0.0)
    for preset in RECORD_PRESETS:
        h = make_settings(preset=preset)
        assert not h.bigram_doc_reset and not h.smear_doc_reset and h.qat_min_clip == 1.0, preset
        assert h.rope_base == tg.RECORD_ROPE_BASE and h.table_dtype == "bf16" and h.table_proj_scale, preset
    grids = {p: (make_settings(preset=p).qat_clip_pct, make_settings(preset=p).qat_full_range,
                 make_settings(preset=p).qat_table_bits) for p in RECORD_PRESETS}
    assert grids == {"pr585": (0.9995, True, 5), "pr592": (1.0, False, 6), "pr578": (0.9995, True, 6),
                     "pr1319": (1.0, True, 6)}
    assert make_settings(preset="pr578").ema_decay == 0.997  # its code; 0.995 is its TTT EMA
    assert make_settings(preset="pr578").ttt_blocks == 9  # it freezes the first 2 of 11 blocks
    ours = make_settings()  # our defaults keep the resets, fp32 tables and the export grid
    assert ours.bigram_doc_reset and ours.smear_doc_reset and ours.rope_base == 10000.0 and ours.table_dtype == "fp32"


def test_bigram_bucket_and_smear_at_a_bos_without_reset(make_settings):
    h = make_settings(preset="pr585", model_dim=64, num_heads=4, num_kv_heads=4, bigram_dim=32)
    big = tg.BigramHash(h)
    ids = torch.tensor([[5, 6, BOS, 7]])
    b = big.bucket(ids)
    assert b[0, 0] == 8191  # position 0: the reserved last bucket
    assert b[0, 2] == 4266  # (36313*1 XOR 27191*6) mod 8191 = 192659 mod 8191: the pair (6, BOS) is hashed
    smear = tg.SmearGate(h)
    x = torch.randn(1, 4, 64)
    out = smear(x, ids)  # gate 0: a 50/50 blend, and the BOS position mixes in the previous document's token
    assert torch.allclose(out[0, 2], 0.5 * x[0, 2] + 0.5 * x[0, 1], atol=1e-6)
    assert torch.allclose(out[0, 0], 0.5 * x[0, 0], atol=1e-6)


def test_record_rope_base():
    assert tg.RECORD_ROPE_BASE == pytest.approx(22081.79, abs=0.005)
    assert tg.RECORD_ROPE_BASE == 10000.0 * (2048 / 1024) ** (16 / (16 - 2))  # the records' rule at T = 2,048
    rope = tg.Rotary(16, tg.RECORD_ROPE_BASE)
    # Pair i rotates by p / base^(2i/16): pair 0 by p, pair 7 by p / 22081.79^(7/8) = p / 6324.56 (= 2·3162.28)
    assert rope.inv_freq[0] == 1.0 and rope.inv_freq[7].item() == pytest.approx(1 / 6324.56, rel=1e-5)


def test_table_projections_start_at_the_records_scale(make_settings):
    small = dict(model_dim=64, num_heads=4, num_kv_heads=4, bigram_buckets=128, bigram_dim=64, ve_dim=64,
                 vocab_size=1024)

    def singular_values_all(w, value):  # W^T W = value^2 I: every singular value (the spectral norm) is value
        return torch.allclose(w.T @ w, value ** 2 * torch.eye(w.size(1)), atol=1e-5)

    model = tg.GPT(make_settings(preset="pr585", **small))
    for proj in (model.bigram.proj.weight, model.ve.proj.weight):
        assert singular_values_all(proj.detach(), 0.21320072)  # 1/sqrt(2*11): 0.213 at 11 layers
    assert singular_values_all(model.blocks[0].attn.c_q.weight.detach(), 1.0)
    ours = tg.GPT(make_settings(**small))
    assert singular_values_all(ours.bigram.proj.weight.detach(), 1.0)


def test_tables_are_bf16_parameters_with_a_bf16_rounded_init(tiny):
    h = tiny(table_dtype="bf16")
    assert tg.build_model(h, tg.Runtime()).tok_emb.weight.dtype == torch.float32  # CPU keeps fp32
    torch.manual_seed(0)
    model = tg.GPT(h)
    tg.tables_in_bf16(model)
    tables = {"tok_emb.weight", "bigram.table.weight", "ve.table.weight"}
    for name, p in model.named_parameters():
        assert p.dtype == (torch.bfloat16 if name in tables else torch.float32), name
        assert torch.equal(p.detach().float(), p.detach().bfloat16().float()), name  # init rounded to bf16
    assert model.bigram.scale.item() == 0.050048828125  # 0.05 as bf16, as the record's scale starts
    avg = tg.WeightAverager(h, model)
    with torch.no_grad():
        model.tok_emb.weight.add_(1.0)
    avg.update(1, 1.0)
    avg.apply_final()
    assert model.tok_emb.weight.dtype == torch.bfloat16  # the EMA (fp32) lands back in the bf16 table
    ids = torch.randint(0, 1024, (1, 16))
    assert torch.isfinite(model(ids, ids)).all()


def test_qat_grid_on_a_hand_made_row():
    """0.9995 row quantile / 15 as the scale, floored at 1/15, codes in [-16, 15]."""
    w = torch.zeros(2, 4001)
    w[0, 0], w[0, 1], w[0, 2] = -3.2, 3.0, 3.0  # sorted |w|: position 0.9995*4000 = 3998 is 3.0
    w[1, 0], w[1, 1] = 0.05, -0.02  # clip 0.05 < 1: the scale floor 1/15 binds
    w.requires_grad_(True)
    q = tg.fake_quantize(w, 5, 0.9995, 1.0, True)
    assert q[0, :3].tolist() == pytest.approx([-3.2, 3.0, 3.0], abs=1e-6)  # scale 0.2: codes -16, 15, 15
    assert q[1, :2].tolist() == pytest.approx([1 / 15, 0.0], abs=1e-7)  # codes round(0.75) = 1, round(-0.3) = 0
    assert (q[:, 3:] == 0).all()
    symmetric = tg.fake_quantize(w, 5, 0.9995, 1.0, False)  # PR #592's clamp: [-15, 15]
    assert symmetric[0, 0].item() == pytest.approx(-3.0, abs=1e-6)
    q.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # straight-through


def test_record_qat_reaches_the_table_projections(make_settings):
    h = make_settings(preset="pr585", model_dim=64, num_heads=4, num_kv_heads=4, num_layers=2, bigram_dim=32,
                      ve_dim=32)
    model = tg.GPT(h)
    tg.set_qat(model, True)
    assert model.bigram.proj.qat_bits == 5 and model.ve.proj.qat_bits == 5
    assert model.blocks[0].mlp.fc.qat_bits == 5 and model.blocks[0].attn.c_q.grid == (0.9995, 1.0, True)
    assert tg.GPT(make_settings(model_dim=64, num_heads=4, num_kv_heads=4, num_layers=2)).bigram.proj.bits == 0  # ours: no QAT there


def test_pr585_ttt_trains_the_last_two_blocks_and_every_scale(make_settings):
    h = make_settings(preset="pr585")
    with torch.device("meta"):  # shapes only: no time spent on the init
        model = tg.GPT(h)
    params = tg.ttt_parameters(h, model)
    assert sum(p.numel() for p in params) == 5_780_500  # its logs: ttt:params unfrozen=5780500
    assert sum(p.numel() for p in model.parameters() if not p.requires_grad) == 27_799_624  # frozen=27799624


def test_ttt_block_and_name_rules(tiny):
    h = tiny(num_layers=4, ttt_blocks=2, ttt_train="scale")
    model = tg.GPT(h)
    names = {n for n, p in model.named_parameters() if any(p is q for q in tg.ttt_parameters(h, model))}
    assert "blocks.1.attn.c_q.weight" not in names and "blocks.2.attn.c_q.weight" in names
    assert "blocks.0.attn_scale" in names and "bigram.scale" in names  # a TTT_TRAIN match beats the freeze
    assert "smear.gate" in names and "tok_emb.weight" not in names  # outside blocks: only TTT_FREEZE applies
    h = tiny()
    everything = tg.ttt_parameters(h, tg.GPT(h))  # the defaults: all but the tables
    assert len(everything) == sum(1 for n, _ in tg.GPT(h).named_parameters()
                                  if not n.startswith(("tok_emb", "bigram", "ve")))


def test_ttt_adamw_uses_ttt_beta2(tiny, monkeypatch):
    seen = {}

    class Stop(Exception):
        pass

    def fake_adamw(params, **kw):
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(torch.optim, "AdamW", fake_adamw)
    h = tiny(ttt_beta2=0.999, ttt_chunk_tokens=64)
    val = tg.ValData(torch.randint(0, 1024, (200,)), torch.ones(1024, dtype=torch.int16),
                     torch.zeros(1024, dtype=torch.bool), torch.zeros(1024, dtype=torch.bool))
    with pytest.raises(Stop):
        tg.evaluate_ttt(h, tg.Runtime(), tg.GPT(h), val)
    assert seen["betas"] == (0.9, 0.999)


def test_record_magnitude_pruning_zeroes_the_smallest_two_percent(tiny):
    h = tiny(prune_magnitude=0.02, quant_method="rtn", quant_clip_embed="absmax", quant_min_numel=0)
    w = torch.arange(1.0, 101.0)[torch.randperm(100, generator=torch.Generator().manual_seed(0))].view(10, 10)
    w = w * torch.where(torch.arange(100).view(10, 10) % 3 == 0, -1.0, 1.0)
    codes = tg.quantize_model(h, {"m.weight": w}, {}).codes["m.weight"]
    # quantile(|w|, 0.02) of 1..100 is 2.98: exactly |w| = 1 and 2 are zeroed; at scale 100/127 they were 1 and 3
    assert set(w.abs()[codes == 0].tolist()) == {1.0, 2.0}
    h.prune_magnitude = 0.0
    assert (tg.quantize_model(h, {"m.weight": w}, {}).codes["m.weight"] != 0).all()


def test_newton_schulz_runs_in_bf16_on_cuda(monkeypatch):
    assert tg.NS_DTYPE == {"cuda": torch.bfloat16}  # the records' X = G.bfloat16()
    torch.manual_seed(0)
    g = torch.randn(64, 32)
    fp32 = tg.zeropower_via_newtonschulz5(g, 5)
    assert not torch.equal(fp32, fp32.bfloat16().float())  # CPU: fp32 arithmetic
    monkeypatch.setitem(tg.NS_DTYPE, "cpu", torch.bfloat16)  # what a CUDA tensor gets
    out = tg.zeropower_via_newtonschulz5(g, 5)
    assert out.dtype == torch.bfloat16  # computed in bf16, and handed to Muon's scaling as bf16
    assert (out.float() - fp32).abs().max() < 0.05


def test_pr1319_focal_loss_and_sqrt_warmdown(tiny, small_data, make_settings):
    h = make_settings(iterations=1000, warmdown_iters=100, max_wallclock_seconds=0, lr_schedule="sqrt")
    assert tg.lr_scale(h, 900, 0) == 1.0 and tg.lr_scale(h, 925, 0) == pytest.approx(0.5)  # 1 - sqrt(1/4)
    assert tg.lr_scale(h, 991, 0) == pytest.approx(0.0460608)  # 1 - sqrt(0.91)
    pr1319 = make_settings(preset="pr1319")
    assert (pr1319.focal_gamma, pr1319.lr_schedule, pr1319.qk_gain_init) == (1.0, "sqrt", 4.0)
    h = tiny(data_path=str(small_data), focal_gamma=1.0, qat_threshold=0)
    torch.manual_seed(0)
    trainer = tg.Trainer(h, tg.Runtime(), tg.GPT(h), val=None)
    x, y = tg.TrainLoader(h, tg.Runtime(), 1).next_batch()
    with torch.no_grad():
        nll = trainer.model(x, y)
    loss = trainer.step(0, 0.0).item()  # the first step's loss, before its update
    assert loss == pytest.approx(((1 - torch.exp(-nll)) * nll).mean().item(), rel=1e-5)
    assert loss < nll.mean().item()


def test_pr1683_qttt_adapts_its_qo_bank(make_settings):
    """PR #1683's qTTT trains its qo_bank: every layer's query and output projections."""
    h = make_settings(preset="pr1683")
    with torch.device("meta"):
        model = tg.GPT(h)
    names = {n for n, p in model.named_parameters() if any(p is q for q in tg.ttt_parameters(h, model))}
    assert names == {f"blocks.{i}.attn.{m}.weight" for i in range(13) for m in ("c_q", "proj")}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 13 * 2 * 512 * 512
