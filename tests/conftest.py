"""Load train_gpt.py and the data tools as modules; give each test a clean settings environment."""
from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample" / "fineweb_sp1024"
TOKENIZER = ROOT / "data" / "tokenizers" / "fineweb_1024_bpe.model"


def load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


tg = load_module("train_gpt", ROOT / "train_gpt.py")
make_shards = load_module("make_shards", ROOT / "data" / "make_shards.py")
downloader = load_module("cached_challenge_fineweb", ROOT / "data" / "cached_challenge_fineweb.py")

# A model small enough for unit tests to run in well under a second.
TINY = dict(num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, train_seq_len=32, eval_seq_len=32,
            train_batch_tokens=256, grad_accum_steps=1, compile=0, device="cpu")


@pytest.fixture
def make_settings(monkeypatch):
    """Settings built from env vars exactly as a run builds them, starting from a clean environment."""
    def make(**env):
        for f in dataclasses.fields(tg.Settings):  # each call starts from a clean environment
            monkeypatch.delenv(f.name.upper(), raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key.upper(), str(value))
        return tg.Settings()

    return make


@pytest.fixture
def tiny(make_settings):
    return lambda **env: make_settings(**{**TINY, "data_path": str(SAMPLE), "tokenizer_path": str(TOKENIZER), **env})


@pytest.fixture
def small_data(tmp_path):
    """A DATA_PATH with two small train shards and a 4,000-token val shard cut from the sample."""
    train = tg.read_shard(SAMPLE / "fineweb_train_000000.bin", 1024)
    val = tg.read_shard(SAMPLE / "fineweb_val_000000.bin", 1024)
    make_shards.write_shard(tmp_path / "fineweb_train_000000.bin", train[:30_000])
    make_shards.write_shard(tmp_path / "fineweb_train_000001.bin", train[30_000:60_000])
    make_shards.write_shard(tmp_path / "fineweb_val_000000.bin", val[:4_000])
    return tmp_path
