"""Export of the frontier records: SDClip k per group, int8 small tensors, LQER corrections, and the
pergroup compressor (role groups, nearest-neighbour row order, lrzip when installed)."""
import shutil

import numpy as np
import pytest
import torch
from conftest import tg

HAS_LRZIP = shutil.which("lrzip") is not None


@pytest.fixture
def fast_codecs(monkeypatch):
    """zstd and rANS only: brotli-11 and lzma-9 on every trial make a pergroup export slow; the choice
    logic is the same for any codec set."""
    monkeypatch.setattr(tg, "CODECS", ("zstd", "rans"))


@pytest.fixture
def model_of(tiny):
    """A tiny model with random (not initial) weights, built from env settings."""
    def make(**env):
        h = tiny(**{**dict(quant_min_numel=0, quant_method="rtn", bigram_buckets=256), **env})
        torch.manual_seed(0)
        model = tg.GPT(h)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.05)
        return h, model
    return make


def reference_model(h, model, q):
    """The model with exactly the weights the exporter means (incl. LQER), built without the container."""
    ref = tg.GPT(h)
    state = {n: t.half().to(t.dtype) if t.is_floating_point() else t for n, t in model.state_dict().items()}
    state.update({n: tg.dequantize(c, q.scales[n], q.lqer.get(n), q.awq.get(n)) for n, c in q.codes.items()})
    ref.load_state_dict(state)
    return ref


def assert_round_trip(h, model, q, path):
    path.write_bytes(tg.pack_artifact(q, tg.encode_all(h, q)))
    fresh = tg.GPT(h)
    tg.load_artifact_into(fresh, path)
    x = torch.randint(0, 1024, (2, 32))
    assert torch.equal(fresh.logits(x), reference_model(h, model, q).logits(x))


def test_sdclip_uses_each_groups_k_and_the_records_ranges(model_of):
    h, model = model_of(quant_clip_mlp="std:11.5", quant_clip_attn="std:13", quant_clip_embed="std:14",
                        quant_bits_mlp=6, quant_bits_attn=6, quant_bits_embed=7)
    state = model.state_dict()
    q = tg.quantize_model(h, state, {})
    for name, k, qmax in (("blocks.0.mlp.fc.weight", 11.5, 31), ("blocks.1.attn.c_q.weight", 13.0, 31),
                          ("tok_emb.weight", 14.0, 63)):
        expected = (k * state[name].float().std(dim=1) / qmax).to(torch.float16)
        assert torch.equal(q.scales[name], expected), name
        assert q.codes[name].abs().max() <= qmax


@pytest.mark.parametrize("env, message", [
    (dict(quant_clip_mlp="std:x"), "QUANT_CLIP_MLP='std:x' must be one of"),
    (dict(quant_clip_attn="std:-1"), "QUANT_CLIP_ATTN='std:-1'"),
    (dict(quant_clip_embed="pct:3"), "QUANT_CLIP_EMBED='pct:3'"),
    (dict(lqer_rank=0), "LQER_RANK=0 must be > 0"),
    (dict(lqer_group=0), "LQER_GROUP=0 must be > 0"),
    (dict(lqer_top_k=-1), "LQER_TOP_K=-1 must be >= 0"),
    (dict(compressor="zpaq"), "COMPRESSOR='zpaq' must be one of"),
    (dict(awq_top_k=-1), "AWQ_TOP_K=-1 must be >= 0"),
    (dict(awq_group=0), "AWQ_GROUP=0 must be > 0"),
])
def test_bad_export_settings_fail_with_one_line(tiny, env, message):
    with pytest.raises(tg.SettingsError, match=message) as e:
        tiny(**env)
    assert "\n" not in str(e.value)


def test_small_tensors_named_by_quant_int8_names_get_int8_absmax(model_of):
    h, model = model_of(attn_gate=1, quant_min_numel=1000, quant_int8_names="attn.gate", quant_method="gptq")
    state = model.state_dict()
    q = tg.quantize_model(h, state, {"blocks.0.attn.gate.weight": torch.eye(64)})  # a Hessian is ignored
    gate = state["blocks.0.attn.gate.weight"]
    assert q.bits["blocks.0.attn.gate.weight"] == 8 and q.bits["blocks.0.attn.c_q.weight"] == 5
    assert torch.equal(q.scales["blocks.0.attn.gate.weight"], (gate.abs().amax(1) / 127).to(torch.float16))
    assert torch.equal(q.codes["blocks.0.attn.gate.weight"].abs().amax(1), torch.full((4,), 127, dtype=torch.int8))
    assert "smear.gate" in q.raw  # 1-D: stays fp16


@pytest.mark.parametrize("shape, group, asym", [((96, 4, 128), 32, True), ((96, 4, 30), 32, False)])
def test_lqer_factor_codes_are_in_range(shape, group, asym):
    rows, rank, cols = shape
    torch.manual_seed(0)
    f = tg.lqer_factors(torch.randn(rows, rank), torch.randn(rank, cols), group)
    lo_a, hi_a, lo_b, hi_b = (-2, 1, -8, 7) if asym else (-7, 7, -7, 7)
    assert lo_a <= f["a"].min() and f["a"].max() <= hi_a and lo_b <= f["b"].min() and f["b"].max() <= hi_b
    assert f["a"].dtype == f["b"].dtype == torch.int8 and f["sa"].dtype == f["sb"].dtype == torch.float16
    assert f["sa"].numel() == (1 if asym else rows) and f["sb"].numel() == (rank * cols // group if asym else rank)


def test_lqer_corrects_the_largest_errors_and_round_trips_exactly(model_of, tmp_path, fast_codecs):
    h, model = model_of(lqer_top_k=2, lqer_rank=4, lqer_group=32, quant_bits_mlp=4, quant_bits_attn=4)
    state = model.state_dict()
    q = tg.quantize_model(h, state, {})
    largest = sorted(q.codes, key=lambda n: -q.stats[n]["mse"])[:2]
    assert sorted(q.lqer) == sorted(largest)
    for name in largest:
        w = state[name].float()
        plain = (w - tg.dequantize(q.codes[name], q.scales[name])).norm()
        assert (w - tg.dequantize(q.codes[name], q.scales[name], q.lqer[name])).norm() < plain
    for compressor in ("rans", "pergroup"):
        h.compressor = compressor
        assert_round_trip(h, model, q, tmp_path / f"{compressor}.ptz")


def test_group_rows_are_permuted_and_restored_exactly():
    torch.manual_seed(0)
    codes = [torch.randint(-15, 16, (12, 5), dtype=torch.int8), torch.randint(-15, 16, (7, 3), dtype=torch.int8)]
    perms = [torch.randperm(12), torch.randperm(7)]
    flat = tg.group_bytes(codes, perms)
    assert np.array_equal(flat[:12], codes[0][perms[0]][:, 0].numpy())  # sorted rows, transposed
    perm = np.frombuffer(torch.cat(perms).numpy().astype(np.uint16).tobytes(), np.uint8)
    shapes = {"a": dict(shape=[12, 5]), "b": dict(shape=[7, 3])}
    back = tg.ungroup(dict(members=["a", "b"]), flat, perm, shapes)
    assert torch.equal(back["a"], codes[0]) and torch.equal(back["b"], codes[1])


def test_nn_row_order_is_the_greedy_l1_chain():
    torch.manual_seed(1)
    codes = torch.randint(-7, 8, (40, 6), dtype=torch.int8)
    order = tg.nn_row_order(codes).tolist()
    assert sorted(order) == list(range(40)) and order[0] == 0
    c, left = codes.long(), set(range(1, 40))
    for prev, nxt in zip(order, order[1:]):
        gaps = {r: int((c[r] - c[prev]).abs().sum()) for r in left}
        assert gaps[nxt] == min(gaps.values())
        left.remove(nxt)


def group_of_prototypes(seed=0):
    """Rows that are noisy copies of a few prototypes, shuffled: a row order that groups them pays."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randint(-31, 32, (4, 64), generator=g)
    rows = protos[torch.randint(0, 4, (256,), generator=g)] + torch.randint(-1, 2, (256, 64), generator=g)
    return rows.clamp(-31, 31).to(torch.int8)


@pytest.mark.parametrize("codes", [group_of_prototypes(), torch.randint(-31, 32, (256, 64), dtype=torch.int8)])
def test_the_row_order_is_chosen_by_measured_bytes(codes):
    q = tg.Quantized({"blocks.0.mlp.fc.weight": codes}, {}, {"blocks.0.mlp.fc.weight": 6}, {}, {}, {}, {})
    out = tg.encode_group("blocks.mlp.fc.weight", ["blocks.0.mlp.fc.weight"], q, ("zstd", "lzma"), {})
    total = sum(s["cost"] for s in out)
    assert total <= min(out[0]["table"]["id"].values())  # sorting never costs bytes: it is kept only if smaller
    assert total <= min(out[0]["table"]["nn"].values()) + out[0]["table"]["perm"]
    assert (out[0]["order"] == "nn") == (len(out) == 2)


def test_prototype_rows_are_sorted():
    q = tg.Quantized({"w": group_of_prototypes()}, {}, {"w": 6}, {}, {}, {}, {})
    out = tg.encode_group("w", ["w"], q, ("zstd",), {})
    assert out[0]["order"] == "nn" and out[1]["part"] == "perm"


def pergroup_export(h, model, tmp_path, capsys):
    h.compressor = "pergroup"
    q = tg.quantize_model(h, model.state_dict(), {})
    blob, streams, _, _ = tg.export_artifact(h, q, code_bytes=0)
    tg.log_export(h, q, streams, {})
    (tmp_path / "m.ptz").write_bytes(blob)
    fresh = tg.GPT(h)
    tg.load_artifact_into(fresh, tmp_path / "m.ptz")
    x = torch.randint(0, 1024, (2, 32))
    assert torch.equal(fresh.logits(x), reference_model(h, model, q).logits(x))
    return streams, capsys.readouterr().out


def test_pergroup_round_trips_without_lrzip(model_of, tmp_path, capsys, monkeypatch, fast_codecs):
    monkeypatch.setattr(tg.shutil, "which", lambda name: None)  # as on a machine without lrzip
    h, model = model_of(target_bytes=-1)
    streams, out = pergroup_export(h, model, tmp_path, capsys)
    groups = {s["name"]: s for s in streams if s["part"] == "group"}
    assert groups["blocks.mlp.fc.weight"]["members"] == ["blocks.0.mlp.fc.weight", "blocks.1.mlp.fc.weight"]
    assert "tok_emb.weight" in groups and not any(s["part"] == "codes" for s in streams)
    assert "pergroup:blocks.attn.c_q.weight tensors:2 " in out and "lrzip" not in out
    assert "artifact_decode_s:" in out


@pytest.mark.skipif(not HAS_LRZIP, reason="lrzip is not installed (apt-get install lrzip)")
def test_pergroup_round_trips_with_lrzip(model_of, tmp_path, capsys, fast_codecs):
    h, model = model_of(target_bytes=-1)
    _, out = pergroup_export(h, model, tmp_path, capsys)
    assert "id_lrzip:" in out and "nn_lrzip:" in out


@pytest.mark.skipif(not HAS_LRZIP, reason="lrzip is not installed (apt-get install lrzip)")
def test_lrzip_streams_round_trip_and_need_lrzip_to_load(monkeypatch):
    data = np.arange(1000).astype(np.uint8)
    enc = tg.encode_stream("raw", data, 8, ("lrzip",))
    entry = dict(enc, part="raw", n=len(data))
    assert np.array_equal(tg.decode_stream(entry, enc["data"], 8), data)
    monkeypatch.setattr(tg.shutil, "which", lambda name: None)
    with pytest.raises(tg.ArtifactError, match="install lrzip"):
        tg.decode_stream(entry, enc["data"], 8)


def test_pruning_keeps_the_pergroup_choices(model_of, monkeypatch, fast_codecs):
    monkeypatch.setattr(tg.shutil, "which", lambda name: None)
    h, model = model_of(compressor="pergroup", target_bytes=-1)
    q = tg.quantize_model(h, model.state_dict(), {})
    full, streams, _, _ = tg.export_artifact(h, q, code_bytes=0)
    h.target_bytes = len(full) - 200
    blob, pruned_streams, counts, _ = tg.export_artifact(h, q, code_bytes=0)
    assert len(blob) <= h.target_bytes and sum(counts.values()) > 0
    before = {(s["name"], s["part"]): s for s in streams}
    for s in pruned_streams:
        old = before[(s["name"], s["part"])]
        assert (s["codec"], s["layout"], s.get("order")) == (old["codec"], old["layout"], old.get("order"))
    tg.deserialize_artifact(blob)


@pytest.mark.parametrize("damage", [lambda b: b[:-7], lambda b: b[:300] + bytes([b[300] ^ 1]) + b[301:]])
def test_damaged_pergroup_artifacts_are_refused(model_of, tmp_path, monkeypatch, damage, fast_codecs):
    monkeypatch.setattr(tg.shutil, "which", lambda name: None)
    h, model = model_of(compressor="pergroup", lqer_top_k=1)
    q = tg.quantize_model(h, model.state_dict(), {})
    (tmp_path / "m.ptz").write_bytes(damage(tg.pack_artifact(q, tg.encode_all(h, q))))
    with pytest.raises(tg.ArtifactError, match="corrupt or truncated"):
        tg.load_artifact_into(tg.GPT(h), tmp_path / "m.ptz")


def test_awq_stores_the_most_salient_column_group_at_int8(tiny):
    h = tiny(quant_min_numel=0, awq_top_k=1, awq_group=64, quant_bits_attn=4, quant_bits_mlp=4,
             quant_clip_attn="absmax", quant_clip_mlp="absmax")
    torch.manual_seed(0)
    state = {"blocks.0.mlp.fc.weight": torch.randn(32, 128), "blocks.0.attn.c_q.weight": torch.randn(32, 128)}
    loud = torch.ones(128)
    loud[64:] = 100.0  # the attention input's second half has 10x the RMS
    hessians = {"blocks.0.mlp.fc.weight": torch.eye(128), "blocks.0.attn.c_q.weight": torch.diag(loud)}
    q = tg.quantize_model(h, state, hessians)
    assert list(q.awq) == ["blocks.0.attn.c_q.weight"] and q.awq["blocks.0.attn.c_q.weight"]["start"] == 64
    a, w = q.awq["blocks.0.attn.c_q.weight"], state["blocks.0.attn.c_q.weight"]
    assert (q.codes["blocks.0.attn.c_q.weight"][:, 64:] == 0).all() and a["codes"].abs().max() > 7
    assert torch.equal(a["scale"], (w.abs().amax(1) / 127).to(torch.float16))
    h.awq_top_k = 0
    plain = tg.quantize_model(h, state, hessians)
    assert q.stats["blocks.0.attn.c_q.weight"]["herr"] < plain.stats["blocks.0.attn.c_q.weight"]["herr"]


def test_awq_with_lqer_round_trips_exactly(model_of, tmp_path):
    h, model = model_of(quant_method="gptq", awq_top_k=2, lqer_top_k=2, compressor="rans")
    state = model.state_dict()
    names = tg.export_bits(h, state)
    q = tg.quantize_model(h, state, {n: torch.eye(state[n].size(1)) for n in names})
    assert len(q.awq) == 2 and len(q.lqer) == 2
    assert_round_trip(h, model, q, tmp_path / "m.ptz")
