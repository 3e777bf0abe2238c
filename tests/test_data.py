import hashlib
import json

import numpy as np
import pytest
import sentencepiece as spm
from conftest import SAMPLE, TOKENIZER, make_shards, tg

OFFICIAL_SP1024_SHA256 = "4f5e8adb109c66b4886963bc75a7befd73bda36d27fd7102df8e9e66503b0e2a"


def test_official_tokenizer_is_bundled():
    assert hashlib.sha256(TOKENIZER.read_bytes()).hexdigest() == OFFICIAL_SP1024_SHA256
    assert TOKENIZER.with_suffix(".vocab").is_file()


def test_shard_round_trip(tmp_path):
    tokens = np.array([1, 5, 1023, 0, 65535 % 1024], dtype=np.int64)
    make_shards.write_shard(tmp_path / "s.bin", tokens)
    raw = (tmp_path / "s.bin").read_bytes()
    assert len(raw) == 1024 + 2 * len(tokens)
    assert np.frombuffer(raw[:12], "<i4").tolist() == [20240520, 1, len(tokens)]
    assert tg.read_shard(tmp_path / "s.bin", 1024).tolist() == tokens.tolist()


def _corrupt(path, header=None, body=b""):
    words = np.zeros(256, "<i4")
    words[:3] = header
    path.write_bytes(words.tobytes() + body)
    return path


@pytest.mark.parametrize("make, message", [
    (lambda p: (p.write_bytes(b"\0" * 100), p)[1], "shorter than the 1024-byte shard header"),
    (lambda p: _corrupt(p, (12345, 1, 2), b"\0" * 4), "bad magic 12345"),
    (lambda p: _corrupt(p, (20240520, 2, 2), b"\0" * 4), "unsupported shard version 2"),
    (lambda p: _corrupt(p, (20240520, 1, 10), b"\0" * 4), "header promises 10 tokens"),
    (lambda p: _corrupt(p, (20240520, 1, 1), b"\0" * 6), "header promises 1 tokens"),
    (lambda p: _corrupt(p, (20240520, 1, 2), np.array([3, 2000], "<u2").tobytes()), "token id 2000 >= VOCAB_SIZE=1024"),
])
def test_bad_shards_name_the_file_and_problem(tmp_path, make, message):
    path = make(tmp_path / "fineweb_train_000000.bin")
    with pytest.raises(tg.DataError) as err:
        tg.read_shard(path, 1024)
    assert str(path) in str(err.value) and message in str(err.value)


def test_missing_shards_say_how_to_get_data(tmp_path):
    with pytest.raises(tg.DataError) as err:
        tg.shard_paths(str(tmp_path), "train")
    assert "cached_challenge_fineweb.py --variant sp1024" in str(err.value) and "PRESET=smoke" in str(err.value)


def test_tokenizer_must_match_vocab_size(tiny, tmp_path):
    with pytest.raises(tg.DataError, match="has 1024 pieces but VOCAB_SIZE=2048"):
        tg.load_tokenizer(tiny(vocab_size=2048))
    with pytest.raises(tg.DataError, match="does not exist"):
        tg.load_tokenizer(tiny(tokenizer_path=str(tmp_path / "nope.model")))


def test_stream_wraps_around_shards(tmp_path):
    make_shards.write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(0, 5))
    make_shards.write_shard(tmp_path / "fineweb_train_000001.bin", np.arange(5, 8))
    stream = tg.TokenStream(tg.shard_paths(str(tmp_path), "train"), 1024)
    assert stream.take(4).tolist() == [0, 1, 2, 3]
    assert stream.take(6).tolist() == [4, 5, 6, 7, 0, 1]


def test_loader_gives_every_world_size_the_same_global_batch(tiny, small_data):
    h = tiny(data_path=str(small_data), train_batch_tokens=4 * 32)
    single = tg.TrainLoader(h, tg.Runtime(), accum=2)
    ranks = [tg.TrainLoader(h, tg.Runtime(rank=r, world_size=2), accum=1) for r in range(2)]
    for _ in range(3):  # three optimizer steps
        one = [single.next_batch() for _ in range(2)]
        two = [loader.next_batch() for loader in ranks]
        for (x1, y1), (x2, y2) in zip(one, two):
            assert x1.shape == (2, 32) and (x1 == x2).all() and (y1 == y2).all()
            assert (x1[:, 1:] == y1[:, :-1]).all()


def test_bundled_sample_is_valid():
    train = [tg.read_shard(p, 1024) for p in tg.shard_paths(str(SAMPLE), "train")]
    val = tg.read_shard(SAMPLE / "fineweb_val_000000.bin", 1024)
    assert sum(map(len, train)) == 8_145_150 and len(val) == 628_457
    assert (val == 1).sum() == 200 and val[0] == 1  # one BOS per document
    assert (SAMPLE.parent / "README.md").read_text().count("ODC-By") >= 1


def test_make_shards_encodes_documents(tmp_path):
    docs = [{"text": f"Document number {i}: the court ruled on 12 cases."} for i in range(7)]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    (tmp_path / "extra.txt").write_text("Plain text is one document.")
    out = tmp_path / "out"
    make_shards.main(["shards", str(tmp_path / "docs.jsonl"), str(tmp_path / "extra.txt"), "--tokenizer",
                      str(TOKENIZER), "--out", str(out), "--num-val-docs", "2", "--shard-tokens", "50"])
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    val = np.concatenate([tg.read_shard(p, 1024) for p in tg.shard_paths(str(out), "val")])
    train_paths = tg.shard_paths(str(out), "train")
    train = np.concatenate([tg.read_shard(p, 1024) for p in train_paths])
    assert len(train_paths) > 1 and all(len(tg.read_shard(p, 1024)) == 50 for p in train_paths[:-1])

    def split_docs(tokens):
        starts = np.flatnonzero(tokens == 1).tolist() + [len(tokens)]
        return [sp.decode(tokens[a + 1:b].tolist()) for a, b in zip(starts, starts[1:])]

    assert split_docs(val) == [d["text"] for d in docs[:2]]
    assert split_docs(train) == [d["text"] for d in docs[2:]] + ["Plain text is one document."]
    with pytest.raises(SystemExit, match="already holds"):
        make_shards.main(["shards", str(tmp_path / "extra.txt"), "--tokenizer", str(TOKENIZER), "--out", str(out)])


def test_make_shards_trains_a_challenge_style_tokenizer(tmp_path):
    src = tmp_path / "docs.jsonl"
    sp_ref = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    val = tg.read_shard(SAMPLE / "fineweb_val_000000.bin", 1024)[:60_000]
    starts = np.flatnonzero(val == 1).tolist() + [len(val)]
    texts = [sp_ref.decode(val[a + 1:b].tolist()) for a, b in zip(starts, starts[1:])]
    src.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    make_shards.main(["tokenizer", str(src), "--vocab-size", "400", "--out-prefix", str(tmp_path / "tok")])
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok.model"))
    assert sp.vocab_size() == 400
    assert [sp.id_to_piece(i) for i in range(5)] == ["<pad>", "<s>", "</s>", "<unk>", "<0x00>"]
    assert sp.piece_to_id("\u2581") != sp.unk_id()
    assert sp.encode("2024") == [sp.piece_to_id(c) for c in "2024"]  # digits split
    assert sp.decode(sp.encode(texts[0])) == texts[0]
    assert len((tmp_path / "tok.vocab").read_text().splitlines()) == 400


def test_coprime_order_visits_every_window_once_per_pass(tmp_path):
    make_shards.write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(0, 41) % 1000)   # 5 windows of 8
    make_shards.write_shard(tmp_path / "fineweb_train_000001.bin", np.arange(100, 125))      # 3 windows
    paths = tg.shard_paths(str(tmp_path), "train")
    windows = tg.CoprimeWindows(paths, 1024, 8, seed=3)
    first = windows.take(8)
    assert first.shape == (8, 9)
    starts = sorted(int(r[0]) for r in first)
    assert starts == [0, 8, 16, 24, 32, 100, 108, 116]  # each window exactly once
    for row in first:
        assert (np.diff(row) == 1).all()  # a window is 9 consecutive tokens of one shard
    assert sorted(int(r[0]) for r in windows.take(8)) == starts  # the next pass again covers all
    again = tg.CoprimeWindows(paths, 1024, 8, seed=3).take(8)
    other = tg.CoprimeWindows(paths, 1024, 8, seed=4).take(8)
    assert (again == first).all() and not (other == first).all()  # the order is the seed's


def test_coprime_loader_gives_every_world_size_the_same_global_batch(tiny, small_data):
    h = tiny(data_path=str(small_data), train_batch_tokens=4 * 32, data_order="coprime")
    single = tg.TrainLoader(h, tg.Runtime(), accum=2)
    ranks = [tg.TrainLoader(h, tg.Runtime(rank=r, world_size=2), accum=1) for r in range(2)]
    for _ in range(3):
        one = [single.next_batch() for _ in range(2)]
        two = [loader.next_batch() for loader in ranks]
        for (x1, y1), (x2, y2) in zip(one, two):
            assert x1.shape == (2, 32) and (x1 == x2).all() and (y1 == y2).all()
            assert (x1[:, 1:] == y1[:, :-1]).all()
