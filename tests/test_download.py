import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, downloader, make_shards, tg

MANIFEST = {
    "datasets": [
        {"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024", "stats": {"files_train": 3, "files_val": 1}},
        {"name": "fineweb10B_sp4096", "tokenizer_name": "sp_bpe_4096", "stats": {"files_train": 2, "files_val": 1}},
    ],
    "tokenizers": [
        {"name": "sp_bpe_1024", "model_path": "tokenizers/fineweb_1024_bpe.model",
         "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"},
    ],
}


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """Replace the hub by a folder: fetch copies <hub>/<remote path> and records what it fetched."""
    hub = tmp_path / "hub" / "datasets"
    (hub / "datasets" / "fineweb10B_sp1024").mkdir(parents=True)
    (hub / "manifest.json").write_text(json.dumps(MANIFEST))
    fetched = []

    def fetch(repo_id, remote_path, dest):
        fetched.append(remote_path)
        source = tmp_path / "hub" / remote_path
        if not source.exists():
            source.parent.mkdir(parents=True, exist_ok=True)
            source.write_bytes(remote_path.encode())
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(source.read_bytes())
        return dest

    monkeypatch.setattr(downloader, "fetch", fetch)
    return fetched


def test_downloads_what_the_manifest_lists_and_skips_present_files(fake_hub, tmp_path):
    data = tmp_path / "data"
    assert downloader.download("r", "datasets", "sp1024", 2, data) == 5
    assert sorted(p.relative_to(data).as_posix() for p in data.rglob("*.*")) == [
        "datasets/fineweb10B_sp1024/fineweb_train_000000.bin", "datasets/fineweb10B_sp1024/fineweb_train_000001.bin",
        "datasets/fineweb10B_sp1024/fineweb_val_000000.bin", "manifest.json",
        "tokenizers/fineweb_1024_bpe.model", "tokenizers/fineweb_1024_bpe.vocab"]
    fake_hub.clear()
    assert downloader.download("r", "datasets", "sp1024", 3, data) == 1  # only the missing shard
    assert fake_hub == ["datasets/manifest.json", "datasets/datasets/fineweb10B_sp1024/fineweb_train_000002.bin"]


@pytest.mark.parametrize("variant, shards, message", [
    ("sp9999", 1, "variant 'sp9999' is not in the manifest; available: sp1024, sp4096"),
    ("sp1024", 4, "sp1024 has 3 train shards in the manifest; asked for 4"),
    ("sp4096", 1, "the manifest names no tokenizer 'sp_bpe_4096'"),
])
def test_bad_requests_are_explained(variant, shards, message):
    with pytest.raises(downloader.DownloadError, match=message):
        downloader.plan_files(MANIFEST, variant, shards)


def test_unreachable_hub_gives_one_clear_line(tmp_path):
    env = {"PATH": os.environ["PATH"], "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(ROOT / "data" / "cached_challenge_fineweb.py"), "--train-shards", "1"],
                          env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: cannot reach the Hugging Face hub")
    assert "PRESET=smoke" in proc.stderr
    assert not (ROOT / "data" / "manifest.json.part").exists()


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line.strip() for line in ci.splitlines() if "pytest" in line)
    assert command in readme
    assert "torch==2.13.0" in command
    assert "torch" in Path(ROOT / "requirements.txt").read_text() and "+cpu" not in (ROOT / "requirements.txt").read_text()


CASEOPS = "sp8192_lossless_caps_caseops_v1_reserved"


def test_caseops_export_comes_with_its_byte_sidecars():
    manifest = {"datasets": [{"name": f"fineweb10B_{CASEOPS}", "tokenizer_name": "tok", "val_bytes_glob": "x",
                              "stats": {"files_train": 80, "files_val": 1}}],
                "tokenizers": [{"name": "tok", "model_path": "tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"}]}
    files = [local for _, local in downloader.plan_files(manifest, CASEOPS, 1)]
    assert files == [f"datasets/fineweb10B_{CASEOPS}/fineweb_val_000000.bin",
                     f"datasets/fineweb10B_{CASEOPS}/fineweb_val_bytes_000000.bin",
                     f"datasets/fineweb10B_{CASEOPS}/fineweb_train_000000.bin",
                     "tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"]


def test_sp8192_caseops_variant_downloads_the_published_export(monkeypatch):
    calls = []
    monkeypatch.setattr(downloader, "download", lambda *args: calls.append(args))
    downloader.main(["--variant", "sp8192_caseops", "--train-shards", "2"])
    downloader.main(["--variant", "sp1024", "--train-shards", "2"])
    assert calls == [("romeerp/parameter-golf-caseops-v1", "datasets", CASEOPS, 2),
                     ("willdepueoai/parameter-golf", "datasets", "sp1024", 2)]


def test_from_docs_builds_the_challenge_split_from_docs_selected(tmp_path, monkeypatch):
    docs = tmp_path / "hub" / "docs_selected.jsonl"
    docs.parent.mkdir()
    docs.write_text("\n".join(json.dumps({"text": f"Document {i}: The NASA launch."}) for i in range(6)))
    fetched = []
    monkeypatch.setattr(downloader, "fetch", lambda repo, remote, dest: fetched.append((repo, remote, dest)) or docs)
    monkeypatch.setattr(make_shards, "CHALLENGE_VAL_DOCS", 2)  # 50,000 at full size
    data = tmp_path / "data"
    (data / "tokenizers").mkdir(parents=True)
    name = "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
    (data / "tokenizers" / name).write_bytes((ROOT / "data" / "tokenizers" / name).read_bytes())
    out = downloader.build_from_docs("sp8192_caseops", 1, data)
    assert fetched == [("willdepueoai/parameter-golf", "datasets/docs_selected.jsonl", None)]
    assert out == data / "datasets" / f"fineweb10B_{CASEOPS}"
    val = tg.read_shard(out / "fineweb_val_000000.bin", 8192)
    assert (val == 1).sum() == 2 and (out / "fineweb_val_bytes_000000.bin").is_file()
    assert len(tg.shard_paths(str(out), "train")) == 1
    with pytest.raises(downloader.DownloadError, match="--from-docs builds sp1024, sp8192, sp8192_caseops"):
        downloader.build_from_docs("sp4096", 1, data)
