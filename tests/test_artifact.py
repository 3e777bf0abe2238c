"""Export: GPTQ and clipping, calibration by self-generation, bit packing, every codec, the container,
pruning to a byte target, and the packed script."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, tg


@pytest.fixture
def trained(tiny):
    """A tiny model with random (not initial) weights; every matrix is quantized."""
    h = tiny(model_dim=128, num_heads=4, num_kv_heads=2, quant_min_numel=0, calib_seqs=4, calib_len=32)
    torch.manual_seed(0)
    model = tg.GPT(h)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return h, model


def correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Inputs with a strongly non-identity covariance, as real activations have."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) * torch.logspace(0, -2, d)[None]
    return torch.randn(n, d, generator=g) @ mix + 0.1 * torch.randn(n, d, generator=g)


def weighted_error(w, codes, scale, H):
    d = w - codes.float() * scale.float()[:, None]
    return float(((d @ H) * d).sum())


@pytest.mark.parametrize("bits", [4, 5, 6])
def test_gptq_beats_round_to_nearest_on_random_layers(bits):
    torch.manual_seed(1)
    w = torch.randn(96, 128) * 0.05
    x = correlated_inputs(2048, 128)
    H = x.T @ x / len(x)
    clips = w.abs().amax(1)[None]  # the same grid for both
    gq, gs, _, _ = tg.gptq_quantize(w, H, bits, clips, block=32)
    rq, rs, _, _ = tg.gptq_quantize(w, None, bits, clips)
    assert torch.equal(gs, rs)
    assert weighted_error(w, gq, gs, H) < 0.8 * weighted_error(w, rq, rs, H)
    assert gq.abs().max() <= 2 ** (bits - 1) - 1


def test_gptq_beats_round_to_nearest_on_trained_layers(trained):
    """Hessians of a model's own Linear layers, from tokens it samples itself."""
    h, model = trained
    state = model.state_dict()
    names = tg.export_bits(h, state)
    tokens = tg.generate_calibration(h, tg.Runtime(), model)
    sums, count = tg.collect_hessians(tg.Runtime(), model, tokens.split(2), names)
    assert count == 4 * 32 and "tok_emb.weight" in sums and "blocks.0.mlp.fc.weight" in sums
    assert "bigram.table.weight" not in sums  # an embedding table has no input matrix: round to nearest
    better = 0
    for name, H in sums.items():
        H = H / count
        w = state[name]
        clips = w.abs().amax(1)[None]
        gptq = weighted_error(w, *tg.gptq_quantize(w, H, 5, clips)[:2], H)
        rtn = weighted_error(w, *tg.gptq_quantize(w, None, 5, clips)[:2], H)
        assert gptq <= rtn * 1.001, name
        better += gptq < 0.95 * rtn
    assert better >= len(sums) // 2


def test_hessians_stay_fp32_under_bf16_autocast(trained):
    """On CUDA the calibration forward runs in bf16 autocast; the Hessians and GPTQ must not."""
    h, model = trained

    class Bf16(tg.Runtime):
        def autocast(self):
            return torch.autocast("cpu", dtype=torch.bfloat16)

    sums, count = tg.collect_hessians(Bf16(), model, [torch.randint(0, 1024, (2, 32))],
                                      tg.export_bits(h, model.state_dict()))
    assert {v.dtype for v in sums.values()} == {torch.float32}
    q = tg.quantize_model(h, model.state_dict(), {k: v / count for k, v in sums.items()})
    assert all(torch.isfinite(torch.tensor(s["herr"])) for s in q.stats.values())


def test_gptq_damps_more_when_the_hessian_is_singular():
    torch.manual_seed(3)
    w = torch.randn(16, 32)
    x = torch.randn(4, 32)  # rank 4 of 32
    H = x.T @ x
    codes, scale, _, _ = tg.gptq_quantize(w, H, 4, w.abs().amax(1)[None], damp=0.0)
    assert codes.abs().max() <= 7 and torch.isfinite(scale.float()).all()


def test_clip_search_keeps_the_best_candidate_per_row(tiny):
    h = tiny()
    torch.manual_seed(2)
    w = torch.randn(64, 256) * 0.02
    w[:, 0] = 0.5  # an outlier column: absmax clipping wastes the grid on it
    x = correlated_inputs(1024, 256, seed=3)
    H = x.T @ x / len(x)
    auto = tg.clip_candidates(h, w, "auto")
    assert auto.shape == (len(tg.parse_floats("clip_sigmas", h.clip_sigmas)) + 1, 64)
    best_q, best_s, best_err, _ = tg.gptq_quantize(w, H, 4, auto)
    for c in range(auto.size(0)):
        _, _, err, _ = tg.gptq_quantize(w, H, 4, auto[c:c + 1])
        assert (best_err <= err + 1e-6 * err.abs().max()).all()
    pct = tg.clip_candidates(h, w, "pct")
    assert torch.allclose(pct[-1], w.abs().amax(1)) and (pct[:-1] <= pct[-1]).all()
    std = tg.clip_candidates(h, w, "std")  # SDClip: k std even past the absmax
    assert torch.allclose(std[0], h.clip_std_k * w.std(1))
    gauss = torch.randn(8, 256)
    assert (tg.clip_candidates(h, gauss, "std")[0] > gauss.abs().amax(1)).all()


def test_self_generated_calibration_is_deterministic_and_in_vocab(trained):
    h, model = trained
    a = tg.generate_calibration(h, tg.Runtime(), model)
    b = tg.generate_calibration(h, tg.Runtime(), model)
    assert a.shape == (4, 32) and torch.equal(a, b) and 0 <= a.min() and a.max() < h.vocab_size
    assert len(set(a[:, 0].tolist())) > 1  # random first tokens, not a fixed prompt


@pytest.mark.parametrize("bits", [4, 5, 6, 7, 8])
def test_bit_packing_is_lossless(bits):
    rng = np.random.default_rng(bits)
    for n in (0, 1, 7, 1001):
        u = rng.integers(0, 2 ** bits - 1, size=n).astype(np.uint8)
        packed = tg.pack_bits(u, bits)
        assert len(packed) == (n * bits + 7) // 8
        assert np.array_equal(tg.unpack_bits(packed, bits, n), u)


@pytest.mark.parametrize("codec", tg.CODECS)
@pytest.mark.parametrize("bits", [4, 5, 6, 8])
def test_every_codec_round_trips_every_stream(codec, bits):
    rng = np.random.default_rng(0)
    qmax = 2 ** (bits - 1) - 1
    codes = np.clip(np.round(rng.laplace(0, qmax / 4, 5000)), -qmax, qmax).astype(np.int8)
    for data in (codes, np.zeros(100, np.int8), np.zeros(0, np.int8)):
        enc = tg.encode_stream("codes", data, bits, (codec,))
        entry = dict(enc, part="codes", n=len(data))
        assert np.array_equal(tg.decode_stream(entry, enc["data"], bits), data)
    scales = np.frombuffer(rng.standard_normal(301).astype(np.float16).tobytes() + b"\x07", np.uint8)
    enc = tg.encode_stream("scale", scales, 8, (codec,))
    assert np.array_equal(tg.decode_stream(dict(enc, part="scale", n=len(scales)), enc["data"], 8), scales)


def test_rans_is_close_to_the_entropy_and_hybrid_picks_the_smallest():
    rng = np.random.default_rng(1)
    codes = np.clip(np.round(rng.laplace(0, 3, 200_000)), -15, 15).astype(np.int8)
    p = np.bincount(codes.astype(np.int64) + 15) / len(codes)
    entropy_bytes = -(p[p > 0] * np.log2(p[p > 0])).sum() * len(codes) / 8
    enc = tg.encode_stream("codes", codes, 5, tg.CODECS)
    assert enc["sizes"]["rans"] < 1.01 * entropy_bytes
    assert enc["cost"] == min(enc["sizes"].values()) and set(enc["sizes"]) == set(tg.CODECS)
    assert enc["sizes"]["rans"] > len(tg.encode_stream("codes", codes, 5, ("rans",))["data"])  # counts charged


@pytest.mark.parametrize("compressor", ["zstd", "lzma", "brotli", "rans", "hybrid"])
def test_artifact_loads_into_a_fresh_model_with_identical_logits(trained, tmp_path, compressor):
    h, model = trained
    h.compressor = compressor
    q = tg.quantize_model(h, model.state_dict(), {})
    assert set(q.bits.values()) == {5, 8} and "blocks.0.attn.c_q.weight" in q.codes
    blob = tg.pack_artifact(q, tg.encode_all(h, q))
    (tmp_path / "m.ptz").write_bytes(blob)
    fresh = tg.GPT(h)
    tg.load_artifact_into(fresh, tmp_path / "m.ptz")
    reference = tg.GPT(h)  # the model with exactly the quantized weights, built without the container
    reference.load_state_dict({**model.state_dict(), **{n: (c.float() * q.scales[n].float()[:, None])
                                                        for n, c in q.codes.items()}})
    for name, t in model.state_dict().items():
        if name not in q.codes:
            reference.state_dict()[name].copy_(t.half().to(t.dtype))
    x = torch.randint(0, 1024, (2, 32))
    assert torch.equal(fresh.logits(x), reference.logits(x))
    assert (fresh.logits(x) - model.logits(x)).abs().max() < 0.5  # and close to the live model (int5)
    assert len(blob) < sum(t.numel() for t in model.state_dict().values())  # < 1 byte per parameter (int5/int8)


def test_small_and_integer_tensors_pass_through(tiny):
    h = tiny()
    state = {"gain": torch.tensor([1.0, -2.5, 3.25]), "steps": torch.tensor([7], dtype=torch.int64),
             "scalar": torch.tensor(0.05), "w": torch.randn(4, 4, dtype=torch.bfloat16)}
    q = tg.quantize_model(h, state, {})
    assert not q.codes and q.raw["gain"].dtype == torch.float16
    back = tg.deserialize_artifact(tg.pack_artifact(q, tg.encode_all(h, q)))
    assert torch.equal(back["gain"], state["gain"]) and torch.equal(back["steps"], state["steps"])
    assert back["scalar"].shape == () and back["scalar"].item() == pytest.approx(0.05, rel=1e-3)
    assert back["w"].dtype == torch.bfloat16 and torch.allclose(back["w"].float(), state["w"].float(), atol=1e-2)


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:len(b) // 2], "corrupt or truncated"),
    (lambda b: b[:-1], "corrupt or truncated"),
    (lambda b: b[:10], "corrupt or truncated"),
    (lambda b: b"XXXXXX" + b[6:], "bad magic"),
    (lambda b: b"PGOLF\x01" + b[6:], "artifact format 1 is not this script's"),
    (lambda b: b[:200] + bytes([b[200] ^ 0x40]) + b[201:], "corrupt"),
    (lambda b: b[:-5] + bytes([b[-5] ^ 0x01]) + b[-4:], "corrupt"),
])
def test_damaged_artifacts_are_refused(trained, tmp_path, damage, message):
    h, model = trained
    h.compressor = "rans"  # fast; the container is the same for every codec
    q = tg.quantize_model(h, model.state_dict(), {})
    path = tmp_path / "m.ptz"
    path.write_bytes(damage(tg.pack_artifact(q, tg.encode_all(h, q))))
    with pytest.raises(tg.ArtifactError, match=message):
        tg.load_artifact_into(tg.GPT(h), path)


def test_artifact_for_another_shape_is_refused(trained, tiny, tmp_path):
    h, model = trained
    h.compressor = "rans"
    q = tg.quantize_model(h, model.state_dict(), {})
    path = tmp_path / "m.ptz"
    path.write_bytes(tg.pack_artifact(q, tg.encode_all(h, q)))
    with pytest.raises(tg.ArtifactError, match="does not match this model's settings"):
        tg.load_artifact_into(tg.GPT(tiny(num_layers=3, model_dim=128)), path)
    with pytest.raises(tg.ArtifactError, match="does not exist"):
        tg.load_artifact_into(tg.GPT(tiny()), tmp_path / "missing.ptz")


def export(h, model):
    q = tg.quantize_model(h, model.state_dict(), {})
    return q, tg.export_artifact(h, q, code_bytes=0)


def test_pruning_meets_the_target_with_the_fewest_codes(trained, capsys):
    h, model = trained
    h.compressor = "rans"
    h.target_bytes = -1
    q, (full, _, _, _) = export(h, model)
    h.target_bytes = len(full) - 3000
    _, (blob, streams, counts, _) = export(h, model)
    n = sum(counts.values())
    assert len(blob) <= h.target_bytes < len(full) and n > 0
    order = tg.prune_order(q)
    one_fewer, _ = tg.pruned(q, order, n - 1)
    assert len(tg.pack_artifact(one_fewer, tg.encode_all(h, one_fewer, like=streams))) > h.target_bytes  # the fewest
    state = tg.deserialize_artifact(blob)
    zeros = sum(int((state[k] == 0).sum()) - int((c == 0).sum()) for k, c in q.codes.items())
    assert zeros == n  # exactly n codes went from +-1 to 0
    assert f"prune: codes:{n} " in capsys.readouterr().out


def test_pruning_says_when_the_target_cannot_be_reached(trained, capsys):
    h, model = trained
    h.compressor, h.target_bytes = "rans", 1000
    _, (blob, _, counts, _) = export(h, model)
    assert not counts and len(blob) > 1000
    assert "prune: cannot reach target:1000" in capsys.readouterr().out


def test_prune_fraction_zeroes_the_cheapest_codes(trained):
    h, model = trained
    h.compressor, h.target_bytes, h.prune_fraction = "zstd", -1, 0.02
    q, (_, _, counts, _) = export(h, model)
    total = sum(c.numel() for c in q.codes.values())
    assert sum(counts.values()) == round(0.02 * total)
    order = tg.prune_order(q)
    cost = lambda i: float(q.scales[list(q.codes)[order.owner[i]]][order.flat[i] // 128].float() ** 2
                           * q.col_weight[list(q.codes)[order.owner[i]]][order.flat[i] % 128])
    assert cost(0) <= cost(len(order.flat) // 2) <= cost(len(order.flat) - 1)


def test_packed_script_runs_identically(tmp_path):
    src = (ROOT / "train_gpt.py").read_text()
    packed = tg.pack_source(src)
    assert packed == tg.pack_source(src) and len(packed) < len(src) / 3  # deterministic, and much smaller
    (tmp_path / "packed.py").write_text(packed)
    env = {"PATH": os.environ["PATH"], "PLAN": "1", "PRESET": "smoke", "DATA_PATH": str(tmp_path)}
    outs = [subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=120) for script in (ROOT / "train_gpt.py", tmp_path / "packed.py")]
    assert all(o.returncode == 0 for o in outs), outs[1].stderr
    untimed = [re.sub(r"\(\d+\.\ds\)", "", o.stdout) for o in outs]
    assert untimed[0] == untimed[1] and "model_params:" in untimed[0]
    assert tg.submitted_code(tg.Settings()) == packed  # the bytes that count are the packed script's
