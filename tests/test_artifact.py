import pytest
import torch
from conftest import tg


@pytest.fixture
def trained(tiny, monkeypatch):
    monkeypatch.setattr(tg, "QUANT_MIN_NUMEL", 0)  # quantize every matrix of the tiny model
    h = tiny(model_dim=128, num_heads=4, num_kv_heads=2)
    torch.manual_seed(0)
    model = tg.GPT(h)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return h, model


@pytest.mark.parametrize("bits", [4, 5, 6, 8])
def test_row_grid_error_is_at_most_half_a_step(bits):
    w = torch.randn(64, 300) * torch.linspace(0.01, 3, 64)[:, None]
    q, scale = tg.quantize_rows(w, bits)
    qmax = 2 ** (bits - 1) - 1
    assert q.abs().max() == qmax and (q == q.round()).all() and scale.dtype == torch.float16
    err = (w - q * scale.float()[:, None]).abs()
    assert (err <= scale.float()[:, None] * 0.5 + 1e-6).all()


def test_small_and_integer_tensors_pass_through():
    state = {"gain": torch.tensor([1.0, -2.5, 3.25]), "steps": torch.tensor([7], dtype=torch.int64),
             "scalar": torch.tensor(0.05),
             "w": torch.randn(4, 4, dtype=torch.bfloat16)}
    arrays, meta = tg.quantize_state(state, {})
    assert [m["kind"] for m in meta.values()] == ["raw"] * 4 and arrays["gain"].dtype == torch.float16
    back = tg.deserialize_artifact(tg.serialize_artifact(state, {}, 3))
    assert torch.equal(back["gain"], state["gain"]) and torch.equal(back["steps"], state["steps"])
    assert back["scalar"].shape == () and back["scalar"].item() == pytest.approx(0.05, rel=1e-3)
    assert back["w"].dtype == torch.bfloat16 and torch.allclose(back["w"].float(), state["w"].float(), atol=1e-2)


def test_round_trip_gives_the_same_logits(trained, tmp_path):
    h, model = trained
    blob = tg.serialize_artifact(model.state_dict(), tg.export_bits(h, model.state_dict()), 22)
    (tmp_path / "m.ptz").write_bytes(blob)
    fresh = tg.GPT(h)
    tg.load_artifact_into(fresh, tmp_path / "m.ptz")
    arrays, meta = tg.quantize_state(model.state_dict(), tg.export_bits(h, model.state_dict()))
    assert {m["kind"] for m in meta.values()} == {"int_row", "raw"}  # matrices quantized, gains and scales fp16
    assert {m.get("bits") for m in meta.values()} == {None, 5, 8}  # int5 blocks, int8 tables (the defaults)  # matrices int8, gains and scales fp16
    reference = tg.GPT(h)
    reference.load_state_dict(tg.dequantize_state(arrays, meta))
    x = torch.randint(0, 1024, (2, 32))
    assert torch.equal(fresh.logits(x), reference.logits(x))  # exactly what was quantized
    assert (fresh.logits(x) - model.logits(x)).abs().max() < 0.5  # and close to the live model (int5)
    assert len(blob) < sum(t.numel() for t in model.state_dict().values())  # < 1 byte per parameter


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:len(b) // 2], "corrupt or truncated"),
    (lambda b: b[:-1], "corrupt or truncated"),
    (lambda b: b"XXXXXX" + b[6:], "bad magic"),
    (lambda b: b[:200] + bytes([b[200] ^ 0x40]) + b[201:], "corrupt"),
])
def test_damaged_artifacts_are_refused(trained, tmp_path, damage, message):
    _, model = trained
    path = tmp_path / "m.ptz"
    path.write_bytes(damage(tg.serialize_artifact(model.state_dict(), {}, 3)))
    with pytest.raises(tg.ArtifactError, match=message):
        tg.load_artifact_into(tg.GPT(trained[0]), path)


def test_artifact_for_another_shape_is_refused(trained, tiny, tmp_path):
    _, model = trained
    path = tmp_path / "m.ptz"
    path.write_bytes(tg.serialize_artifact(model.state_dict(), {}, 3))
    with pytest.raises(tg.ArtifactError, match="does not match this model's settings"):
        tg.load_artifact_into(tg.GPT(tiny(num_layers=3, model_dim=128)), path)
    with pytest.raises(tg.ArtifactError, match="does not exist"):
        tg.load_artifact_into(tg.GPT(tiny()), tmp_path / "missing.ptz")
