"""Turn documents into challenge-format token shards, or train a SentencePiece tokenizer.

Shard format (as the challenge's export): 256 little-endian int32 header words
([0]=20240520 magic, [1]=1 version, [2]=token count, rest 0), then the tokens as
little-endian uint16. Every document is written as [BOS] + sp.encode(text), no EOS,
documents concatenated and allowed to span shard boundaries.

Inputs are .jsonl files (one JSON object per line, text under --text-field) or any
other file, read as plain UTF-8 text holding one document.

  # shards: validation from its own file(s), or the first --num-val-docs documents
  python3 data/make_shards.py shards --tokenizer data/tokenizers/fineweb_1024_bpe.model \
      --out data/sample/fineweb_sp1024 --val val.jsonl train.jsonl
  # a new tokenizer with the challenge's settings
  python3 data/make_shards.py tokenizer --vocab-size 1024 --out-prefix data/tokenizers/my_bpe docs.jsonl
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_WORDS = 256
SHARD_TOKENS = 100_000_000  # the published export's shard size
BOS_ID = 1


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
    """Buffers tokens and writes fineweb_{split}_{i:06d}.bin files of shard_tokens each."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.buf: list[np.ndarray] = []
        self.buffered = self.index = self.total = 0

    def add(self, tokens: np.ndarray) -> None:
        self.buf.append(tokens)
        self.buffered += tokens.size
        while self.buffered >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def _flush(self, n: int) -> None:
        flat = np.concatenate(self.buf)
        write_shard(self.out_dir / f"fineweb_{self.split}_{self.index:06d}.bin", flat[:n])
        self.buf, self.buffered = [flat[n:]], flat.size - n
        self.index += 1
        self.total += n

    def close(self) -> int:
        if self.buffered:
            self._flush(self.buffered)
        return self.total


def encode_documents(sp, docs: Iterable[str], writer: ShardWriter, batch_size: int = 256) -> int:
    count = 0
    for batch in _batches(docs, batch_size):
        for ids in sp.encode(batch, out_type=int):
            writer.add(np.asarray([BOS_ID, *ids], dtype=np.int64))
            count += 1
    return count


def cmd_shards(args: argparse.Namespace) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(args.tokenizer))
    if sp.bos_id() != BOS_ID:
        raise SystemExit(f"error: {args.tokenizer} has bos_id {sp.bos_id()}, the challenge format needs {BOS_ID}")
    if sp.vocab_size() > 65536:
        raise SystemExit(f"error: vocab {sp.vocab_size()} does not fit the uint16 shard format")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stale = sorted(out.glob("fineweb_*.bin"))
    if stale:
        raise SystemExit(f"error: {out} already holds {len(stale)} shard(s); remove them or choose another --out")
    train_docs = read_documents(args.inputs, args.text_field)
    if args.val:
        val_docs: Iterable[str] = read_documents(args.val, args.text_field)
    else:
        val_docs = (doc for _, doc in zip(range(args.num_val_docs), train_docs))
    results = {}
    for split, docs in (("val", val_docs), ("train", train_docs)):
        writer = ShardWriter(out, split, args.shard_tokens)
        n_docs = encode_documents(sp, docs, writer)
        results[split] = (n_docs, writer.close(), writer.index)
    for split, (n_docs, n_tokens, n_files) in results.items():
        print(f"{split}: docs:{n_docs} tokens:{n_tokens} shards:{n_files} -> {out}")
    if results["val"][1] == 0 or results["train"][1] == 0:
        raise SystemExit("error: a split came out empty; give --val or a positive --num-val-docs and enough documents")


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
    docs = (doc for _, doc in zip(range(args.max_docs), read_documents(args.inputs, args.text_field)))
    spm.SentencePieceTrainer.train(
        sentence_iterator=docs, model_writer=model, vocab_size=args.vocab_size,
        max_sentence_length=args.max_sentence_length, num_threads=args.threads, **CHALLENGE_SP_SETTINGS,
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
    s.add_argument("--num-val-docs", type=int, default=0, help="without --val: the first N documents go to val")
    s.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS, help="tokens per shard file")
    s.add_argument("--text-field", default="text")
    s.set_defaults(func=cmd_shards)
    t = sub.add_parser("tokenizer", help="train a SentencePiece BPE tokenizer with the challenge's settings")
    t.add_argument("inputs", nargs="+", help=".jsonl or plain-text files")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--out-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    t.add_argument("--max-docs", type=int, default=1_000_000, help="train on at most this many documents")
    t.add_argument("--max-sentence-length", type=int, default=1 << 20, help="longer documents are skipped")
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--text-field", default="text")
    t.set_defaults(func=cmd_tokenizer)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if getattr(args, "shard_tokens", 1) <= 0 or getattr(args, "num_val_docs", 0) < 0:
        raise SystemExit("error: --shard-tokens must be positive and --num-val-docs non-negative")
    args.func(args)


if __name__ == "__main__":
    main()
