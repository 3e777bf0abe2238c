"""Download the published FineWeb shards and tokenizers from the Hugging Face hub, or build what
is not published from the challenge's documents.

The export's manifest.json says which variants exist, how many train/val shards each has and
which tokenizer files belong to it, so the variant list is read from it, never hard-coded.

  python3 data/cached_challenge_fineweb.py --variant sp1024                   # val + 80 train shards
  python3 data/cached_challenge_fineweb.py --variant sp1024 --train-shards 1  # a quick look
  python3 data/cached_challenge_fineweb.py --list                             # variants in the manifest
  python3 data/cached_challenge_fineweb.py --variant sp8192_caseops           # the frontier records' CaseOps data
  python3 data/cached_challenge_fineweb.py --variant sp8192 --from-docs       # built from docs_selected.jsonl

Files land in data/datasets/fineweb10B_<variant>/ and data/tokenizers/; files already present
are skipped, so an interrupted download resumes. sp8192_caseops is the public CaseOps export
(romeerp/parameter-golf-caseops-v1, variant sp8192_lossless_caps_caseops_v1_reserved: the shards plus
fineweb_val_bytes_*.bin byte sidecars). --from-docs downloads the challenge's document list
(docs_selected.jsonl, large) and encodes it with the tokenizer in data/tokenizers/: validation = its
first 50,000 documents, train = the rest (data/make_shards.py).
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
# Published exports of other hub repos: our variant name -> (dataset repo, the variant in its manifest).
EXPORTS = {"sp8192_caseops": ("romeerp/parameter-golf-caseops-v1", "sp8192_lossless_caps_caseops_v1_reserved")}
# What --from-docs builds: variant -> (dataset folder suffix, tokenizer in data/tokenizers/).
BUILDS = {
    "sp1024": ("sp1024", "fineweb_1024_bpe.model"),
    "sp8192": ("sp8192", "fineweb_8192_bpe.model"),
    "sp8192_caseops": ("sp8192_lossless_caps_caseops_v1_reserved",
                       "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"),
}
DOCS = "docs_selected.jsonl"  # the challenge's document list, in its export root


class DownloadError(RuntimeError):
    pass


def fetch(repo_id: str, remote_path: str, dest: Path | None) -> Path:
    """Download one file of the dataset repo to dest (atomic: a partial file never looks complete);
    with dest None, the file in the hub's cache."""
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
    if dest is None:
        return cached
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
    if entry.get("val_bytes_glob") or "caseops" in entry["name"]:  # a byte sidecar per val shard (CaseOps)
        files += [(f"{ds}/fineweb_val_bytes_{i:06d}.bin",) * 2 for i in range(n_val)]
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


def build_from_docs(variant: str, train_shards: int, data_dir: Path = DATA_DIR, repo_id: str = DEFAULT_REPO,
                    root: str = DEFAULT_ROOT) -> Path:
    """Encode the challenge's documents into data/datasets/fineweb10B_<suffix>/ with a bundled tokenizer."""
    if variant not in BUILDS:
        raise DownloadError(f"--from-docs builds {', '.join(BUILDS)}, not {variant!r}")
    if train_shards < 1:
        raise DownloadError("--from-docs needs --train-shards >= 1")
    suffix, tokenizer_name = BUILDS[variant]
    tokenizer = data_dir / "tokenizers" / tokenizer_name
    if not tokenizer.is_file():
        raise DownloadError(f"{tokenizer} is missing; it comes with the repository (data/tokenizers/)")
    docs = fetch(repo_id, f"{root}/{DOCS}", None)
    if str(Path(__file__).resolve().parent) not in sys.path:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
    import make_shards

    out = data_dir / "datasets" / f"fineweb10B_{suffix}"
    make_shards.build_shards([docs], tokenizer, out, num_val_docs=make_shards.CHALLENGE_VAL_DOCS,
                             max_train_shards=train_shards)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="sp1024",
                   help=f"tokenizer family, e.g. sp1024 (see --list), or {', '.join(EXPORTS)} (other hub repos)")
    p.add_argument("--train-shards", type=int, default=DEFAULT_TRAIN_SHARDS, help="train shards (100M tokens each)")
    p.add_argument("--repo-id", help=f"Hugging Face dataset repo (default: {DEFAULT_REPO}, or the variant's export)")
    p.add_argument("--from-docs", action="store_true",
                   help=f"build the variant from the challenge's {DOCS} instead ({', '.join(BUILDS)})")
    p.add_argument("--remote-root", default=DEFAULT_ROOT, help="folder of the export inside the repo")
    p.add_argument("--list", action="store_true", help="print the manifest's variants and exit")
    args = p.parse_args(argv)
    try:
        if args.train_shards < 0:
            raise DownloadError("--train-shards must be >= 0")
        if args.from_docs:
            build_from_docs(args.variant, args.train_shards, repo_id=args.repo_id or DEFAULT_REPO,
                            root=args.remote_root)
            return
        repo_id, variant = args.repo_id or DEFAULT_REPO, args.variant
        if args.variant in EXPORTS and args.repo_id is None:
            repo_id, variant = EXPORTS[args.variant]
        if args.list:
            for name, entry in sorted(variants(load_manifest(repo_id, args.remote_root, DATA_DIR)).items()):
                stats = entry.get("stats") or {}
                print(f"{name}: train_shards:{stats.get('files_train')} val_shards:{stats.get('files_val')}")
            return
        download(repo_id, args.remote_root, variant, args.train_shards)
    except DownloadError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
