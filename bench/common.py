"""What the bench scripts share: the repository root and loading its scripts as modules."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_module(name: str, relative: str):
    """A repository script (e.g. "train_gpt.py") imported as module `name`; nothing runs at import."""
    spec = importlib.util.spec_from_file_location(name, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def make_data(tg, make_shards, sample: Path, vocab: int, folder: Path, val_tokens: int) -> int:
    """DATA_PATH with a sample's train shards (links) and its val, with the byte sidecar if it has one, cut at
    the last document start (BOS) within its first val_tokens tokens; returns the tokens kept."""
    folder.mkdir(parents=True)
    for shard in sorted(sample.glob("fineweb_train_*.bin")):
        (folder / shard.name).symlink_to(shard)
    val = tg.read_shard(sample / "fineweb_val_000000.bin", vocab)
    starts = (val[1:val_tokens + 1] == tg.BOS_ID).nonzero()[0]
    cut = 1 + int(starts[-1]) if starts.size else min(val_tokens, len(val))
    make_shards.write_shard(folder / "fineweb_val_000000.bin", val[:cut])
    sidecar = sample / "fineweb_val_bytes_000000.bin"
    if sidecar.exists():
        make_shards.write_shard(folder / sidecar.name, tg.read_shard(sidecar, 65536)[:cut])
    return cut
