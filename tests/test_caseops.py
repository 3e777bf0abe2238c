"""SP8192 with lossless CaseOps: the transform, the byte sidecars, the builder's split guard, the reader."""
import hashlib
import json
import random

import numpy as np
import pytest
import sentencepiece as spm
import torch
from conftest import ROOT, SAMPLE, TOKENIZER, make_shards, tg

ms = make_shards
TOKENIZERS = ROOT / "data" / "tokenizers"
CASEOPS_TOKENIZER = TOKENIZERS / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
SP8192_TOKENIZER = TOKENIZERS / "fineweb_8192_bpe.model"
CASEOPS_SAMPLE = ROOT / "data" / "sample" / "fineweb_sp8192_caseops"
RAW_TEXT = ROOT.parent / "shared" / "data" / "fineweb_text"  # the raw FineWeb documents, where present
T, A, C, E = ms.TITLE, ms.ALLCAPS, ms.CAPNEXT, ms.ESC

ADVERSARIAL = [
    "", " ", "   \n\t ", "\n", "\u3000", "A", "a", "Aa", "AA", "aA", "AaA", "ABc", "aBC", "I", "I'm OK", "NASA's",
    "McDonald's iPhone eBay XMLHttpRequest", "x1Y2Z3", "snake_case_ID and CamelCase", "ALL CAPS SENTENCE.",
    "Straße STRASSE ẞ ß", "İstanbul ıi İI", "ǅemal Ǆ ǆ ǈ ǋ", "ΣΑΣ σας Ω", "Кириллица ПРИВЕТ", "日本語テキスト",
    "ﬁne ﬂow", "Kelvin: \u212a, Ångström: \u212b", "ſ long s", "E\u0301 e\u0301 A\u030a", "Ａ full-width Ｂ",
    "\ue000\ue001\ue002\ue003\ue004\ue005\uf8ff", E, E + E, E + T + "a", T + "Word", "A" + T + "B", "a" + C + "b",
    "\U0001f600 emoji 😀 and \u200d ZWJ", "\x00 NUL \x7f DEL", "tab\tend ", " lead and trail ", "\u2581x ▁y",
]


def docs_of(tokens: np.ndarray) -> list[tuple[int, int]]:
    starts = np.flatnonzero(tokens == 1).tolist() + [len(tokens)]
    return list(zip(starts, starts[1:]))


@pytest.fixture(scope="module")
def sample_texts():
    """Every document of the bundled sp1024 sample (3,000), decoded: real text, in the repository."""
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    tokens = np.concatenate([tg.read_shard(p, 1024) for p in sorted(SAMPLE.glob("fineweb_*.bin"))])
    return sp.decode([tokens[a + 1:b].tolist() for a, b in docs_of(tokens)])


def raw_documents(name: str) -> list[str]:
    path = RAW_TEXT / name
    if not path.is_file():
        pytest.skip(f"{path} is not here (the raw FineWeb text lives outside the repository)")
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_caseops_encodes_case_as_markers():
    assert ms.caseops_encode("The NASA Launch") == f"{T}the {A}nasa {T}launch"
    assert ms.caseops_encode("iPhone") == f"i{C}phone"
    assert ms.caseops_encode("A McDonald") == f"{T}a {T}mc{C}donald"
    assert ms.caseops_encode("ABc aBC") == f"{T}a{C}bc a{C}b{C}c"
    assert ms.caseops_encode("x" + T + "Y" + E) == f"x{E}{T}{T}y{E}{E}"  # existing controls are escaped
    assert ms.caseops_encode("Straße İstanbul ǅ") == f"{T}straße İstanbul ǅ"  # only ASCII letters change


@pytest.mark.parametrize("name", ["fineweb_challenge_docs_200.jsonl", "fineweb_sample_docs.jsonl"])
def test_round_trip_on_every_raw_document(name):
    docs = raw_documents(name)
    assert sum(ms.caseops_decode(ms.caseops_encode(d)) == d for d in docs) == len(docs)


def test_round_trip_on_every_sample_document(sample_texts):
    assert len(sample_texts) == 3000
    assert sum(ms.caseops_decode(ms.caseops_encode(d)) == d for d in sample_texts) == 3000


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_round_trip_on_adversarial_text(text):
    encoded = ms.caseops_encode(text)
    assert ms.caseops_decode(encoded) == text
    assert not any("A" <= c <= "Z" for c in encoded)


def test_decoding_is_the_exact_inverse_on_random_text():
    """decode(encode(s)) == s, and whatever decode accepts re-encodes to itself: a bijection onto the outputs."""
    rng = random.Random(0)
    alphabet = "aAbBzZ 1ß" + T + A + C + E
    accepted = 0
    for _ in range(20000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
        assert ms.caseops_decode(ms.caseops_encode(s)) == s
        try:
            decoded = ms.caseops_decode(s)
        except ms.CaseOpsError:
            continue
        accepted += 1
        assert ms.caseops_encode(decoded) == s
    assert accepted > 1000


@pytest.mark.parametrize("text, message", [
    ("A", "uppercase"), (T, "not followed"), (T + " a", "not followed"), (A + "a", "ALLCAPS must mark 2+"),
    (A + "a" + C + "b", "ALLCAPS must mark 2+"), (T + "a" + C + "b", "must be written with ALLCAPS"),
    ("a" + T + "b", "inside a run"), (E + "x", "ESC must precede"), ("a" + C, "not followed"), (C + "a", "not followed"),
])
def test_decoding_refuses_what_the_encoder_never_writes(text, message):
    with pytest.raises(ms.CaseOpsError, match=message):
        ms.caseops_decode(text)


def test_original_bytes_of_surfaces():
    assert ms.original_bytes([T, "the", " " + A, "nasa", "é"], caseops=True) == [0, 3, 1, 4, 2]
    assert ms.original_bytes([E, T, "x"], caseops=True) == [0, 3, 1]  # an escaped control is text: 3 bytes
    assert ms.original_bytes([T + "a"], caseops=False) == [4]


def test_bundled_caseops_tokenizer_and_sample():
    assert hashlib.sha256(CASEOPS_TOKENIZER.read_bytes()).hexdigest() == \
        "97754754561f20def5edd99765ca0668f880bd94e67316d54aa10ab25f45cc4d"
    sp = spm.SentencePieceProcessor(model_file=str(CASEOPS_TOKENIZER))
    assert ms.is_caseops_tokenizer(sp) and [sp.id_to_piece(i) for i in range(4, 8)] == [T, A, C, E]
    assert not ms.is_caseops_tokenizer(spm.SentencePieceProcessor(model_file=str(SP8192_TOKENIZER)))
    assert tg.shard_paths(str(CASEOPS_SAMPLE), "val") == [CASEOPS_SAMPLE / "fineweb_val_000000.bin"]
    val = tg.read_shard(CASEOPS_SAMPLE / "fineweb_val_000000.bin", 8192)
    side = tg.read_shard(CASEOPS_SAMPLE / "fineweb_val_bytes_000000.bin", 1 << 16)
    assert len(side) == len(val) == 490_163 and (val == 1).sum() == 200
    assert int(side.sum()) == 1_489_515  # the UTF-8 bytes of fineweb_challenge_docs_200.jsonl
    assert len(tg.read_shard(CASEOPS_SAMPLE / "fineweb_train_000000.bin", 8192)) == 1_000_000
    assert "fineweb_sp8192_caseops" in (CASEOPS_SAMPLE.parent / "README.md").read_text()


def write_jsonl(path, texts):
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts), encoding="utf-8")
    return path


def build(tmp_path, name, tokenizer, val_texts, *extra):
    train = write_jsonl(tmp_path / "train.jsonl", ["Some training text.", "More of It."])
    val = write_jsonl(tmp_path / "val.jsonl", val_texts)
    out = tmp_path / name
    ms.main(["shards", str(train), "--tokenizer", str(tokenizer), "--out", str(out), "--val", str(val), *extra])
    return out


@pytest.fixture(scope="module")
def val_texts(sample_texts):
    """The raw challenge documents where present (else the sample's decoded ones), plus adversarial text
    that SentencePiece keeps whole (no leading/trailing whitespace, which it drops)."""
    path = RAW_TEXT / "fineweb_challenge_docs_200.jsonl"
    docs = [json.loads(line)["text"] for line in path.read_text().splitlines()] if path.is_file() else sample_texts[:200]
    return docs + [t for t in ADVERSARIAL if t and t == t.strip() and "\u2581" not in t]


@pytest.mark.parametrize("tokenizer", [TOKENIZER, SP8192_TOKENIZER, CASEOPS_TOKENIZER])
def test_sidecars_count_the_original_bytes_of_every_document(tmp_path, tokenizer, val_texts, make_settings):
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    out = build(tmp_path, "out", tokenizer, val_texts, "--byte-sidecar")
    h = make_settings(data_path=str(out), tokenizer_path=str(tokenizer), vocab_size=sp.vocab_size())
    val = tg.load_val_data(h, sp)
    assert val.sidecar is not None
    per_doc = [int(val.sidecar[a:b].sum()) for a, b in docs_of(val.tokens.numpy())]
    assert per_doc == [len(t.encode("utf-8")) for t in val_texts]  # every document, exactly
    total = sum(per_doc)
    assert int(val.bytes_at(torch.arange(val.tokens.numel() - 1)).sum()) == total
    without = tg.ValData(val.tokens, val.base_bytes, val.has_space, val.is_boundary)
    pieces = int(without.bytes_at(torch.arange(val.tokens.numel() - 1)).sum())
    if ms.is_caseops_tokenizer(sp):
        assert pieces > total  # the markers' pieces would count 3 bytes each: CaseOps needs its sidecar
    else:  # the challenge's rule counts the pieces, i.e. the text after SentencePiece's normalization
        ids = [val.tokens[a + 1:b].tolist() for a, b in docs_of(val.tokens.numpy())]
        assert pieces == sum(len(t.encode("utf-8")) for t in sp.decode(ids))


class UniformModel(torch.nn.Module):
    def forward(self, x, y):
        return torch.full(y.shape, 9.0)


def test_bpb_of_the_same_text_counts_the_same_original_bytes(tmp_path, val_texts, make_settings, monkeypatch):
    """sp1024, sp8192 and sp8192-CaseOps: evaluate() scores every target once and divides by the same bytes."""
    totals = set()
    for tokenizer in (TOKENIZER, SP8192_TOKENIZER, CASEOPS_TOKENIZER):
        sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
        out = build(tmp_path, tokenizer.stem, tokenizer, val_texts[:20], "--byte-sidecar")
        h = make_settings(data_path=str(out), tokenizer_path=str(tokenizer), vocab_size=sp.vocab_size(),
                          eval_seq_len=64, eval_batch_tokens=640, device="cpu")
        val = tg.load_val_data(h, sp)
        loss, bpb, n_tokens, n_bytes = tg.evaluate(h, tg.Runtime(), UniformModel(), val)
        assert n_tokens == val.tokens.numel() - 1 and bpb == pytest.approx(9.0 * n_tokens / (np.log(2) * n_bytes))
        totals.add(n_bytes)
    assert totals == {sum(len(t.encode("utf-8")) for t in val_texts[:20])}


def test_builder_writes_caseops_shards_and_sidecars(tmp_path):
    texts = ["The NASA Launch", "iPhone " + T + " x", "plain"]
    out = build(tmp_path, "out", CASEOPS_TOKENIZER, texts, "--shard-tokens", "8")
    sp = spm.SentencePieceProcessor(model_file=str(CASEOPS_TOKENIZER))
    vals = tg.shard_paths(str(out), "val")
    assert len(vals) > 1
    tokens = np.concatenate([tg.read_shard(p, 8192) for p in vals])
    side = np.concatenate([tg.read_shard(p.with_name(p.name.replace("val_", "val_bytes_")), 1 << 16) for p in vals])
    decoded = [ms.caseops_decode(sp.decode(tokens[a + 1:b].tolist())) for a, b in docs_of(tokens)]
    assert decoded == texts
    assert [int(side[a:b].sum()) for a, b in docs_of(tokens)] == [len(t.encode()) for t in texts]
    marker, escaped = (tokens >= 4) & (tokens <= 7), np.r_[False, tokens[:-1] == 7]
    assert side[tokens == 1].tolist() == [0, 0, 0] and (side[marker & ~escaped] == 0).all()
    assert side[escaped].tolist() == [3]  # the literal U+E001 in the text is 3 original bytes
    assert not list(out.glob("fineweb_train_bytes_*"))  # like the published export: val sidecars only


@pytest.mark.parametrize("inputs, extra, message", [
    (["docs"], ["--num-val-docs", "10000"], "docs_selected.jsonl with --num-val-docs 10000; its first 50,000 documents"),
    (["docs"], ["--num-val-docs", "60000"], "give it first with --num-val-docs 50000"),
    (["other", "docs"], [], "after another input"),
    (["docs"], ["--val", "other"], "--val with"),
    (["other"], ["--val", "other"], "is both a --val file and a train input"),
])
def test_builder_refuses_any_split_that_trains_on_validation_documents(tmp_path, inputs, extra, message):
    """Challenge issue #2127: a --val-docs 10000 default put 80% of the validation documents into training."""
    files = dict(docs=write_jsonl(tmp_path / "docs_selected.jsonl", ["one", "two", "three"]),
                 other=write_jsonl(tmp_path / "other.jsonl", ["four"]))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as err:
        ms.main(["shards", *(str(files[i]) for i in inputs), "--tokenizer", str(TOKENIZER), "--out", str(out),
                 *(str(files.get(a, a)) for a in extra)])
    assert str(err.value).startswith("error: ") and message in str(err.value) and "\n" not in str(err.value)
    assert not out.exists()  # refused before anything was written


def test_builder_splits_the_challenge_list_at_50000(tmp_path, monkeypatch):
    monkeypatch.setattr(ms, "CHALLENGE_VAL_DOCS", 2)  # the rule, at test size
    docs = write_jsonl(tmp_path / "docs_selected.jsonl", [f"Document {i}." for i in range(5)])
    res = ms.build_shards([docs], TOKENIZER, tmp_path / "out", num_val_docs=2, shard_tokens=4, max_train_shards=2)
    assert (res["val"]["docs"], res["train"]["shards"], res["train"]["tokens"]) == (2, 2, 8)


def test_caseops_tokenizer_training_reserves_the_markers(tmp_path, sample_texts):
    src = write_jsonl(tmp_path / "docs.jsonl", sample_texts[:150])
    ms.main(["tokenizer", str(src), "--caseops", "--vocab-size", "400", "--out-prefix", str(tmp_path / "tok")])
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok.model"))
    assert [sp.id_to_piece(i) for i in range(9)] == ["<pad>", "<s>", "</s>", "<unk>", T, A, C, E, "<0x00>"]
    assert ms.is_caseops_tokenizer(sp)
    text = ms.caseops_encode(sample_texts[0])
    assert sp.decode(sp.encode(text)) == sp.decode(sp.encode(sp.decode(sp.encode(text))))


def sidecar_data(tmp_path, counts=None, header=None):
    tokens = np.array([1, 300, 301, 1, 302], dtype=np.int64)
    ms.write_shard(tmp_path / "fineweb_val_000000.bin", tokens)
    side = np.array([0, 3, 2, 0, 1] if counts is None else counts)
    ms.write_shard(tmp_path / "fineweb_val_bytes_000000.bin", side)
    if header is not None:
        raw = bytearray((tmp_path / "fineweb_val_bytes_000000.bin").read_bytes())
        raw[:4] = np.array([header], "<i4").tobytes()
        (tmp_path / "fineweb_val_bytes_000000.bin").write_bytes(bytes(raw))
    return tmp_path


@pytest.mark.parametrize("setup, message", [
    (lambda p: sidecar_data(p, counts=[0, 3, 2, 0]), "4 byte counts do not match the 5 tokens"),
    (lambda p: sidecar_data(p, counts=[0, 3, 2, 1, 1]), "count bytes for a BOS"),
    (lambda p: sidecar_data(p, header=777), "bad magic 777"),
    (lambda p: (ms.write_shard(sidecar_data(p) / "fineweb_val_bytes_000001.bin", np.zeros(2)), p)[1],
     "do not pair one to one with val shards"),
])
def test_a_sidecar_that_does_not_match_its_shard_is_refused(tmp_path, make_settings, setup, message):
    data = setup(tmp_path)
    h = make_settings(data_path=str(data), tokenizer_path=str(TOKENIZER))
    with pytest.raises(tg.DataError) as err:
        tg.load_val_data(h, spm.SentencePieceProcessor(model_file=str(TOKENIZER)))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_caseops_data_without_sidecars_is_refused(tmp_path, make_settings):
    ms.write_shard(tmp_path / "fineweb_val_000000.bin", np.array([1, 300, 4, 301]))
    h = make_settings(data_path=str(tmp_path), tokenizer_path=str(CASEOPS_TOKENIZER), vocab_size=8192)
    with pytest.raises(tg.DataError, match="is a CaseOps tokenizer but DATA_PATH=.* has no fineweb_val_bytes"):
        tg.load_val_data(h, spm.SentencePieceProcessor(model_file=str(CASEOPS_TOKENIZER)))


def test_caseops_preset_reads_the_bundled_sample(make_settings):
    h = make_settings(preset="smoke,caseops", data_path=str(CASEOPS_SAMPLE))
    assert (h.vocab_size, h.num_layers) == (8192, tg.PRESETS["smoke"]["num_layers"])
    val = tg.load_val_data(h, tg.load_tokenizer(h))
    assert int(val.bytes_at(torch.arange(val.tokens.numel() - 1)).sum()) == 1_489_515
    assert tg.TrainLoader(h, tg.Runtime(), accum=1).next_batch()[0].max() < 8192


def test_builder_warns_when_sentencepiece_drops_whitespace(tmp_path, capsys):
    build(tmp_path, "out", CASEOPS_TOKENIZER, ["  Leading and trailing  ", "Fine."])
    assert "the sidecars count 25 of the validation documents' 29 UTF-8 bytes" in capsys.readouterr().err
