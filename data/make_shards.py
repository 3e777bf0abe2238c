"""Turn documents into challenge-format token shards, or train a SentencePiece tokenizer.

Shard format (as the challenge's export): 256 little-endian int32 header words
([0]=20240520 magic, [1]=1 version, [2]=token count, rest 0), then the tokens as
little-endian uint16. Every document is written as [BOS] + sp.encode(text), no EOS,
documents concatenated and allowed to span shard boundaries.

CaseOps (lossless_caps_caseops_v1, the frontier records' data): a tokenizer whose pieces include
the control characters U+E001..U+E004 gets the text through caseops_encode first, and every
validation shard fineweb_val_NNNNNN.bin gets a byte sidecar fineweb_val_bytes_NNNNNN.bin: the same
header, then one little-endian uint16 per token, the UTF-8 bytes of the ORIGINAL text that token
accounts for (BOS 0, CaseOps markers 0), so val_bpb counts the original bytes. --byte-sidecar
writes such sidecars for any tokenizer.

Validation is the first 50,000 documents of the challenge's list (docs_selected.jsonl) and no
validation document may reach a train shard: the builder refuses any split that would allow it.

Inputs are .jsonl files (one JSON object per line, text under --text-field) or any
other file, read as plain UTF-8 text holding one document.

  # shards: validation from its own file(s), or the first --num-val-docs documents (default 50,000)
  python3 data/make_shards.py shards --tokenizer data/tokenizers/fineweb_1024_bpe.model \
      --out data/sample/fineweb_sp1024 --val val.jsonl train.jsonl
  python3 data/make_shards.py shards --out data/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved \
      --tokenizer data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model docs_selected.jsonl
  # a new tokenizer with the challenge's settings (--caseops: on CaseOps text, markers reserved)
  python3 data/make_shards.py tokenizer --vocab-size 1024 --out-prefix data/tokenizers/my_bpe docs.jsonl
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import sys
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_WORDS = 256
SHARD_TOKENS = 100_000_000  # the published export's shard size
BOS_ID = 1
CHALLENGE_DOCS = "docs_selected.jsonl"  # the challenge's document list
CHALLENGE_VAL_DOCS = 50_000  # its first 50,000 documents are the validation split


# -----------------------------------------------------------------------------
# CaseOps (lossless_caps_caseops_v1): case moved into four private-use control characters
# -----------------------------------------------------------------------------
# Every maximal run of ASCII letters [A-Za-z] is written in lowercase, its case carried by markers:
#   all lowercase: unchanged            "the"    -> the
#   2+ letters, all uppercase: ALLCAPS   "NASA"   -> ALLCAPS nasa
#   Title (first upper, rest lower, 2+): TITLE   "Launch" -> TITLE launch
#   any other run ("A", "iPhone", "McD"): TITLE if the first letter is uppercase, then each later
#   uppercase letter preceded by CAPNEXT ("iPhone" -> i CAPNEXT phone, "A" -> TITLE a).
# Everything else (digits, non-ASCII letters such as 'ß', 'İ', 'ǅ') passes unchanged, and a control
# character already in the text is escaped as ESC + that character. Decoding accepts exactly the
# encoder's outputs (anything else raises CaseOpsError), so the map is a bijection onto them.
TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
CASEOPS_CONTROLS = (TITLE, ALLCAPS, CAPNEXT, ESC)
# Only what changes is matched (lowercase runs are left alone): a maximal letter run holding an
# uppercase letter, or a control character.
_CASE_RUN = re.compile(r"(?<![A-Za-z])[a-z]*[A-Z][A-Za-z]*|[\ue001-\ue004]")
# An escaped character | TITLE/ALLCAPS + a lowercase run with CAPNEXT before letters | an unmarked run
# with CAPNEXT | anything else that is not plain text: a stray marker or an uppercase ASCII letter.
_CASE_TOKEN = re.compile(r"\ue004(?P<esc>.)|(?P<mark>[\ue001\ue002])(?P<word>[a-z]+(?:\ue003[a-z]+)*)"
                         r"|(?P<mixed>[a-z]+(?:\ue003[a-z]+)+)|[\ue001-\ue004A-Z]", re.S)


class CaseOpsError(ValueError):
    pass


def _encode_run(m: re.Match) -> str:
    word = m.group()
    if word in CASEOPS_CONTROLS:
        return ESC + word
    lower = word.lower()
    if len(word) >= 2 and word.isupper():
        return ALLCAPS + lower
    if word[1:].islower() and word[0].isupper():
        return TITLE + lower
    rest = "".join(CAPNEXT + c.lower() if c.isupper() else c for c in word[1:])
    return (TITLE if word[0].isupper() else "") + lower[0] + rest


def caseops_encode(text: str) -> str:
    return _CASE_RUN.sub(_encode_run, text)


def _decode_token(m: re.Match) -> str:
    where = f"invalid CaseOps text at character {m.start()}"
    if m["esc"] is not None:
        if m["esc"] not in CASEOPS_CONTROLS:
            raise CaseOpsError(f"{where}: ESC must precede a control character, not {m['esc']!r}")
        return m["esc"]
    body, marker = m["word"] or m["mixed"], m["mark"]
    if body is None:
        raise CaseOpsError(f"{where}: {m.group()!r} is not followed by what it marks (or is an uppercase letter)")
    if marker and m.start() and "a" <= m.string[m.start() - 1] <= "z":
        raise CaseOpsError(f"{where}: a word marker inside a run of letters")
    letters = body.replace(CAPNEXT, "")
    n_caps = len(body) - len(letters)
    if marker == ALLCAPS:
        if n_caps or len(letters) < 2:
            raise CaseOpsError(f"{where}: ALLCAPS must mark 2+ letters without CAPNEXT")
        return letters.upper()
    if marker and len(letters) >= 2 and n_caps == len(letters) - 1:
        raise CaseOpsError(f"{where}: an all-uppercase word must be written with ALLCAPS")
    out, upper = [], bool(marker)
    for c in body:
        if c == CAPNEXT:
            upper = True
        else:
            out.append(c.upper() if upper else c)
            upper = False
    return "".join(out)


def caseops_decode(text: str) -> str:
    """The inverse of caseops_encode; text that caseops_encode cannot produce raises CaseOpsError."""
    return _CASE_TOKEN.sub(_decode_token, text)


def is_caseops_tokenizer(sp) -> bool:
    """A tokenizer trained on CaseOps text holds the four control characters as pieces."""
    return all(sp.piece_to_id(c) != sp.unk_id() for c in CASEOPS_CONTROLS)


def original_bytes(surfaces: Iterable[str], caseops: bool) -> list[int]:
    """UTF-8 bytes of the original text behind each piece, from the pieces' surfaces (the input
    span each piece covers, before SentencePiece's normalization): CaseOps markers count 0 and a
    character escaped by ESC counts its own bytes, so a document's counts sum to its UTF-8 length."""
    counts, escaped = [], False
    for surface in surfaces:
        n = len(surface.encode("utf-8"))
        if caseops:
            for c in surface:
                if escaped:
                    escaped = False
                elif c in CASEOPS_CONTROLS:
                    n, escaped = n - len(c.encode("utf-8")), c == ESC
        counts.append(n)
    return counts


def write_shard(path: str | Path, tokens: np.ndarray) -> None:
    """Write one shard; ids must fit uint16 like the official export."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() > 65535):
        raise ValueError(f"{path}: token ids must be in [0, 65535] to fit uint16")
    header = np.zeros(HEADER_WORDS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, tokens.size)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())


def read_documents(paths: Iterable[str | Path], text_field: str = "text") -> Iterator[str]:
    for path in map(Path, paths):
        if path.suffix != ".jsonl":
            yield path.read_text(encoding="utf-8")
            continue
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)[text_field]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise SystemExit(f"error: {path}:{lineno}: not a JSON object with a {text_field!r} field ({e})")
                yield doc


def _batches(docs: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class ShardWriter:
    """Buffers tokens and writes fineweb_{split}_{i:06d}.bin files of shard_tokens each
    (at most max_shards files when it is positive; what is left over is dropped)."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int, max_shards: int = 0):
        self.out_dir, self.split, self.shard_tokens, self.max_shards = out_dir, split, shard_tokens, max_shards
        self.buf: list[np.ndarray] = []
        self.buffered = self.index = self.total = 0

    @property
    def full(self) -> bool:
        return 0 < self.max_shards <= self.index

    def add(self, tokens: np.ndarray) -> None:
        self.buf.append(tokens)
        self.buffered += tokens.size
        while self.buffered >= self.shard_tokens and not self.full:
            self._flush(self.shard_tokens)

    def _flush(self, n: int) -> None:
        flat = np.concatenate(self.buf)
        write_shard(self.out_dir / f"fineweb_{self.split}_{self.index:06d}.bin", flat[:n])
        self.buf, self.buffered = [flat[n:]], flat.size - n
        self.index += 1
        self.total += n

    def close(self) -> int:
        if self.buffered and not self.full:
            self._flush(self.buffered)
        return self.total


def encode_documents(sp, docs: Iterable[str], writer: ShardWriter, *, caseops: bool = False,
                     sidecar: ShardWriter | None = None, val_hashes: set | None = None, is_val: bool = False,
                     batch_size: int = 256) -> dict:
    """Write [BOS] + pieces per document, and with a sidecar writer [0] + the original bytes of each
    piece. Validation documents' hashes go into val_hashes; a train document whose text has one of
    them is counted (identical texts in the source list itself), never silently dropped."""
    stats = dict(docs=0, bytes=0, sidecar_bytes=0, same_as_val=0)
    for batch in _batches(docs, batch_size):
        if writer.full:
            break
        texts = [caseops_encode(t) for t in batch] if caseops else batch
        if sidecar is None:
            encoded = [(ids, None) for ids in sp.encode(texts, out_type=int)]
        else:  # surfaces need the protobuf package (SentencePiece's own dependency for this)
            encoded = [([p.id for p in proto.pieces], original_bytes((p.surface for p in proto.pieces), caseops))
                       for proto in sp.encode(texts, out_type="proto")]
        for doc, (ids, counts) in zip(batch, encoded):
            if writer.full:
                break
            raw = doc.encode("utf-8")
            digest = hashlib.blake2b(raw, digest_size=16).digest()
            if is_val:
                val_hashes.add(digest)
            elif val_hashes is not None and digest in val_hashes:
                stats["same_as_val"] += 1
            writer.add(np.asarray([BOS_ID, *ids], dtype=np.int64))
            if sidecar is not None:
                sidecar.add(np.asarray([0, *counts], dtype=np.int64))
                stats["sidecar_bytes"] += sum(counts)
            stats["docs"] += 1
            stats["bytes"] += len(raw)
    return stats


def check_split(inputs: list, val: list | None, num_val_docs: int) -> None:
    """Refuse (one line) every split in which a validation document could reach a train shard."""
    challenge = [Path(p) for p in inputs if Path(p).name == CHALLENGE_DOCS]
    leak = (f"; its first {CHALLENGE_VAL_DOCS:,} documents are the validation split and must never reach a train "
            "shard (challenge issue #2127)")
    if val:
        both = {Path(v).resolve() for v in val} & {Path(p).resolve() for p in inputs}
        if both:
            raise SystemExit(f"error: {sorted(both)[0]} is both a --val file and a train input, so all of its "
                             "validation documents would be trained on; give each file once")
        if challenge:
            raise SystemExit(f"error: --val with {challenge[0]} as a train input{leak}; "
                             f"drop --val (the first {CHALLENGE_VAL_DOCS:,} documents become val)")
    elif challenge and (Path(inputs[0]).name != CHALLENGE_DOCS or num_val_docs != CHALLENGE_VAL_DOCS):
        raise SystemExit(f"error: {challenge[0]} with --num-val-docs {num_val_docs}"
                         f"{' after another input' if Path(inputs[0]).name != CHALLENGE_DOCS else ''}{leak}; "
                         f"give it first with --num-val-docs {CHALLENGE_VAL_DOCS}")


def build_shards(inputs: list, tokenizer: str | Path, out: str | Path, *, val: list | None = None,
                 num_val_docs: int = CHALLENGE_VAL_DOCS, shard_tokens: int = SHARD_TOKENS,
                 max_train_shards: int = 0, byte_sidecar: bool = False, text_field: str = "text") -> dict:
    import sentencepiece as spm

    check_split(inputs, val, num_val_docs)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    if sp.bos_id() != BOS_ID:
        raise SystemExit(f"error: {tokenizer} has bos_id {sp.bos_id()}, the challenge format needs {BOS_ID}")
    if sp.vocab_size() > 65536:
        raise SystemExit(f"error: vocab {sp.vocab_size()} does not fit the uint16 shard format")
    caseops = is_caseops_tokenizer(sp)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stale = sorted(out.glob("fineweb_*.bin"))
    if stale:
        raise SystemExit(f"error: {out} already holds {len(stale)} shard(s); remove them or choose another --out")
    train_docs = read_documents(inputs, text_field)
    if val:
        val_docs: Iterable[str] = read_documents(val, text_field)
    else:
        val_docs = (doc for _, doc in zip(range(num_val_docs), train_docs))
    val_hashes: set = set()
    results = {}
    for split, docs in (("val", val_docs), ("train", train_docs)):
        writer = ShardWriter(out, split, shard_tokens, 0 if split == "val" else max_train_shards)
        with_sidecar = split == "val" and (caseops or byte_sidecar)
        sidecar = ShardWriter(out, "val_bytes", shard_tokens) if with_sidecar else None
        stats = encode_documents(sp, docs, writer, caseops=caseops, sidecar=sidecar, val_hashes=val_hashes,
                                 is_val=split == "val")
        stats.update(tokens=writer.close(), shards=writer.index)
        if sidecar is not None:
            sidecar.close()
        results[split] = stats
    v, t = results["val"], results["train"]
    side = f" sidecar_bytes:{v['sidecar_bytes']}" if caseops or byte_sidecar else ""
    print(f"val: docs:{v['docs']} tokens:{v['tokens']} shards:{v['shards']} bytes:{v['bytes']}{side} "
          f"caseops:{int(caseops)} -> {out}")
    print(f"train: docs:{t['docs']} tokens:{t['tokens']} shards:{t['shards']} -> {out}")
    if side and v["sidecar_bytes"] != v["bytes"]:
        print(f"warning: the sidecars count {v['sidecar_bytes']} of the validation documents' {v['bytes']} UTF-8 "
              "bytes: SentencePiece drops a document's leading and trailing whitespace, which no token covers",
              file=sys.stderr)
    if t["same_as_val"]:
        print(f"warning: {t['same_as_val']} train document(s) have the same text as a validation document "
              "(duplicates in the source list itself; kept)", file=sys.stderr)
    if v["tokens"] == 0 or t["tokens"] == 0:
        raise SystemExit("error: a split came out empty; give --val or a positive --num-val-docs and enough documents")
    return results


def cmd_shards(args: argparse.Namespace) -> None:
    build_shards(args.inputs, args.tokenizer, args.out, val=args.val, num_val_docs=args.num_val_docs,
                 shard_tokens=args.shard_tokens, max_train_shards=args.max_train_shards,
                 byte_sidecar=args.byte_sidecar, text_field=args.text_field)


# The official sp1024 tokenizer's trainer spec (read from its model file): BPE, byte
# fallback, digits split, NFKC, no dummy prefix, ids pad/bos/eos/unk = 0/1/2/3.
CHALLENGE_SP_SETTINGS = dict(
    model_type="bpe",
    character_coverage=0.999,
    split_digits=True,
    byte_fallback=True,
    hard_vocab_limit=False,
    normalization_rule_name="nmt_nfkc",
    add_dummy_prefix=False,
    pad_id=0,
    bos_id=1,
    eos_id=2,
    unk_id=3,
)


def cmd_tokenizer(args: argparse.Namespace) -> None:
    import sentencepiece as spm

    model = io.BytesIO()
    # The CaseOps export's recipe: NUL -> space, each document stripped, then the transform; the
    # markers are reserved as user-defined pieces (ids 4-7, always whole pieces).
    docs = (doc.replace("\0", " ").strip() for _, doc in zip(range(args.max_docs),
                                                               read_documents(args.inputs, args.text_field)))
    spm.SentencePieceTrainer.train(
        sentence_iterator=map(caseops_encode, docs) if args.caseops else docs, model_writer=model,
        vocab_size=args.vocab_size, max_sentence_length=args.max_sentence_length, num_threads=args.threads,
        user_defined_symbols=list(CASEOPS_CONTROLS) if args.caseops else [], **CHALLENGE_SP_SETTINGS,
    )
    prefix = Path(args.out_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.vocab_size()))
    prefix.with_suffix(".vocab").write_text(vocab, encoding="utf-8")
    if sp.piece_to_id("\u2581") == sp.unk_id():
        # Without a lone "▁" piece a space becomes 3 byte-fallback tokens and bpb is miscounted.
        print("warning: the tokenizer has no standalone '\u2581' piece; train_gpt.py will refuse it", file=sys.stderr)
    print(f"tokenizer: vocab:{sp.vocab_size()} -> {prefix}.model, {prefix}.vocab")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("shards", help="encode documents into train/val shards")
    s.add_argument("inputs", nargs="+", help=".jsonl or plain-text files")
    s.add_argument("--tokenizer", required=True, help="SentencePiece .model file")
    s.add_argument("--out", required=True, help="output folder (becomes DATA_PATH)")
    s.add_argument("--val", action="append", help="a file whose documents go to the validation split (repeatable)")
    s.add_argument("--num-val-docs", type=int, default=CHALLENGE_VAL_DOCS,
                   help="without --val: the first N documents go to val (the challenge's: 50,000)")
    s.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS, help="tokens per shard file")
    s.add_argument("--max-train-shards", type=int, default=0, help="stop after N train shards (0: all documents)")
    s.add_argument("--byte-sidecar", action="store_true",
                   help="write fineweb_val_bytes_*.bin for any tokenizer (CaseOps tokenizers always get them)")
    s.add_argument("--text-field", default="text")
    s.set_defaults(func=cmd_shards)
    t = sub.add_parser("tokenizer", help="train a SentencePiece BPE tokenizer with the challenge's settings")
    t.add_argument("inputs", nargs="+", help=".jsonl or plain-text files")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--out-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    t.add_argument("--max-docs", type=int, default=1_000_000, help="train on at most this many documents")
    t.add_argument("--max-sentence-length", type=int, default=1 << 20, help="longer documents are skipped")
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--caseops", action="store_true", help="train on CaseOps text with the 4 markers reserved")
    t.add_argument("--text-field", default="text")
    t.set_defaults(func=cmd_tokenizer)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    counts = (getattr(args, "num_val_docs", 0), getattr(args, "max_train_shards", 0))
    if getattr(args, "shard_tokens", 1) <= 0 or min(counts) < 0:
        raise SystemExit("error: --shard-tokens must be positive, --num-val-docs and --max-train-shards non-negative")
    args.func(args)


if __name__ == "__main__":
    main()
