"""Download the published FineWeb shards and tokenizers from the Hugging Face hub.

The export's manifest.json says which variants exist, how many train/val shards each has and
which tokenizer files belong to it, so the variant list is read from it, never hard-coded.

  python3 data/cached_challenge_fineweb.py --variant sp1024                   # val + 80 train shards
  python3 data/cached_challenge_fineweb.py --variant sp1024 --train-shards 1  # a quick look
  python3 data/cached_challenge_fineweb.py --list                             # variants in the manifest

Files land in data/datasets/fineweb10B_<variant>/ and data/tokenizers/; files already present
are skipped, so an interrupted download resumes.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
DEFAULT_REPO = "willdepueoai/parameter-golf"
DEFAULT_ROOT = "datasets"  # the export's folder inside the hub repo
DEFAULT_TRAIN_SHARDS = 80  # 8B tokens, what the records train on


class DownloadError(RuntimeError):
    pass


def fetch(repo_id: str, remote_path: str, dest: Path) -> Path:
    """Download one file of the dataset repo to dest (atomic: a partial file never looks complete)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        cached = Path(hf_hub_download(repo_id=repo_id, filename=remote_path, repo_type="dataset"))
    except LocalEntryNotFoundError as e:
        raise DownloadError(f"cannot reach the Hugging Face hub for {remote_path} ({type(e).__name__}); check the "
                            "network or HF_ENDPOINT, or train offline on the bundled sample with PRESET=smoke") from None
    except HfHubHTTPError as e:
        raise DownloadError(f"the hub refused {repo_id}/{remote_path}: {str(e).splitlines()[0]}") from None
    except OSError as e:  # connection errors from the HTTP client
        raise DownloadError(f"cannot reach the Hugging Face hub ({e}); check the network or HF_ENDPOINT, "
                            "or train offline on the bundled sample with PRESET=smoke") from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    shutil.copyfile(cached.resolve(), tmp)
    tmp.replace(dest)
    return dest


def load_manifest(repo_id: str, root: str, data_dir: Path) -> dict:
    path = fetch(repo_id, f"{root}/manifest.json", data_dir / "manifest.json")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DownloadError(f"{path} is not valid JSON ({e}); delete it and run again") from None


def variants(manifest: dict) -> dict[str, dict]:
    """{variant: dataset entry}; a dataset named fineweb10B_sp1024 is the variant sp1024."""
    return {d["name"].split("_", 1)[-1]: d for d in manifest.get("datasets", []) if "name" in d}


def plan_files(manifest: dict, variant: str, train_shards: int) -> list[tuple[str, str]]:
    """(path inside the export, local path relative to data/) for everything the variant needs."""
    found = variants(manifest)
    if variant not in found:
        raise DownloadError(f"variant {variant!r} is not in the manifest; available: {', '.join(sorted(found))}")
    entry = found[variant]
    stats = entry.get("stats") or {}
    n_train, n_val = int(stats.get("files_train", 0)), int(stats.get("files_val", 0))
    if train_shards > n_train:
        raise DownloadError(f"{variant} has {n_train} train shards in the manifest; asked for {train_shards}")
    ds = f"datasets/{entry['name']}"
    files = [(f"{ds}/fineweb_val_{i:06d}.bin",) * 2 for i in range(n_val)]
    files += [(f"{ds}/fineweb_train_{i:06d}.bin",) * 2 for i in range(train_shards)]
    tok = next((t for t in manifest.get("tokenizers", []) if t.get("name") == entry.get("tokenizer_name")), None)
    if tok is None:
        raise DownloadError(f"the manifest names no tokenizer {entry.get('tokenizer_name')!r} for {variant}")
    for key in ("model_path", "vocab_path", "path"):
        if tok.get(key):
            files.append((tok[key], f"tokenizers/{Path(tok[key]).name}"))
    return files


def download(repo_id: str, root: str, variant: str, train_shards: int, data_dir: Path = DATA_DIR) -> int:
    from tqdm import tqdm

    manifest = load_manifest(repo_id, root, data_dir)
    files = plan_files(manifest, variant, train_shards)
    todo = [(remote, local) for remote, local in files if not (data_dir / local).is_file()]
    print(f"{variant}: {len(files)} files, {len(files) - len(todo)} already present")
    for remote, local in tqdm(todo, unit="file", disable=not todo):
        fetch(repo_id, f"{root}/{remote}", data_dir / local)
    return len(todo)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="sp1024", help="tokenizer family, e.g. sp1024 (see --list)")
    p.add_argument("--train-shards", type=int, default=DEFAULT_TRAIN_SHARDS, help="train shards (100M tokens each)")
    p.add_argument("--repo-id", default=DEFAULT_REPO, help="Hugging Face dataset repo")
    p.add_argument("--remote-root", default=DEFAULT_ROOT, help="folder of the export inside the repo")
    p.add_argument("--list", action="store_true", help="print the manifest's variants and exit")
    args = p.parse_args(argv)
    try:
        if args.train_shards < 0:
            raise DownloadError("--train-shards must be >= 0")
        if args.list:
            for name, entry in sorted(variants(load_manifest(args.repo_id, args.remote_root, DATA_DIR)).items()):
                stats = entry.get("stats") or {}
                print(f"{name}: train_shards:{stats.get('files_train')} val_shards:{stats.get('files_val')}")
            return
        download(args.repo_id, args.remote_root, args.variant, args.train_shards)
    except DownloadError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
