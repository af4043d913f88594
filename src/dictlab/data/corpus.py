"""Text sources -> documents -> fixed-length token contexts, split into train/eval by document.

Sources (`CorpusConfig.source`):
- `embedded`: text that ships with every CPython install — the reference-manual topics in
  `pydoc_data.topics`, then the standard library's Python source files (docstrings and code).
  Real technical English and code, a few million tokens; not web text.
- a local `.txt`, `.jsonl`, `.jsonl.zst` or `.parquet` file, or a folder of them (read in sorted
  order). A `.txt` file is one document; JSON lines and parquet rows carry the text in `field`.
- `hub:NAME`: a dataset streamed with `datasets` (default `monology/pile-uncopyrighted`, field
  `text`). NAME may also be a local dataset folder, which is how the hub path is tested offline.
"""

from __future__ import annotations

import hashlib
import io
import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path

from pydantic import Field

from dictlab.errors import DictlabError
from dictlab.options import Strict


class CorpusConfig(Strict):
    source: str = Field("embedded", description="'embedded', 'hub:NAME', or a local file/folder")
    field: str = Field("text", description="JSON/parquet field holding the text")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="fraction of documents held out for eval")
    seed: int = Field(0, description="seed of the document split")

LOCAL_SUFFIXES = (".txt", ".jsonl", ".jsonl.zst", ".parquet")


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in LOCAL_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return None


def _stdlib_sources() -> Iterator[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).parts
        if "site-packages" in rel or "dist-packages" in rel:
            continue
        try:
            yield path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue


def embedded_documents() -> Iterator[str]:
    """CPython's reference-manual topics (prose) alternating with standard-library .py files (code)."""
    from pydoc_data.topics import topics

    prose = (topics[key] for key in sorted(topics))
    for pair in zip_longest(prose, _stdlib_sources()):
        yield from (doc for doc in pair if doc is not None)


def _json_lines(lines: Iterator[str], field: str, where: Path) -> Iterator[str]:
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DictlabError(f"{where}:{lineno}: not valid JSON ({e.msg})") from e
        if field not in record:
            raise DictlabError(f"{where}:{lineno}: no field {field!r} (fields: {', '.join(record)})")
        yield record[field]


def file_documents(path: Path, field: str = "text") -> Iterator[str]:
    suffix = _suffix(path)
    if suffix == ".txt":
        yield path.read_text(encoding="utf-8", errors="replace")
    elif suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            yield from _json_lines(f, field, path)
    elif suffix == ".jsonl.zst":
        import zstandard

        with open(path, "rb") as raw:
            reader = zstandard.ZstdDecompressor().stream_reader(raw)
            yield from _json_lines(io.TextIOWrapper(reader, encoding="utf-8"), field, path)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if field not in pf.schema_arrow.names:
            raise DictlabError(f"{path}: no column {field!r} (columns: {', '.join(pf.schema_arrow.names)})")
        for batch in pf.iter_batches(columns=[field], batch_size=1024):
            yield from batch.column(0).to_pylist()
    else:
        raise DictlabError(f"unsupported file type {path.name!r}; accepted: {', '.join(LOCAL_SUFFIXES)}")


def hub_documents(name: str, field: str = "text", split: str = "train") -> Iterator[str]:
    import datasets

    try:
        stream = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as e:  # datasets raises many types for a missing or unreachable dataset
        raise DictlabError(f"could not open dataset {name!r}: {e}") from e
    for record in stream:
        if field not in record:
            raise DictlabError(f"dataset {name!r} has no field {field!r} (fields: {', '.join(record)})")
        yield record[field]


def check_source(source: str) -> None:
    """Fail fast, before a model is loaded, on a local source that cannot be read."""
    if source == "embedded" or source.startswith("hub:"):
        return
    path = Path(source)
    if not path.exists():
        raise DictlabError(f"corpus {source!r} not found: give 'embedded', 'hub:NAME' or an existing file or folder")
    if path.is_file() and _suffix(path) is None:
        raise DictlabError(f"unsupported file type {path.name!r}; accepted: {', '.join(LOCAL_SUFFIXES)}")


def documents(source: str, field: str = "text") -> Iterator[str]:
    """All documents of a source, in a fixed order."""
    if source == "embedded":
        yield from embedded_documents()
        return
    if source.startswith("hub:"):
        yield from hub_documents(source[4:], field)
        return
    check_source(source)
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p))
        if not files:
            raise DictlabError(f"folder {source!r} holds no {', '.join(LOCAL_SUFFIXES)} files")
        for f in files:
            yield from file_documents(f, field)
    else:
        yield from file_documents(path, field)


def split_of(doc_id: int, eval_fraction: float, seed: int) -> str:
    """'eval' or 'train' for a document, by a stable hash of its index: a split by document."""
    h = hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest()
    return "eval" if int.from_bytes(h, "little") / 2**64 < eval_fraction else "train"


@dataclass(frozen=True)
class Context:
    """One model input: BOS then up to context_length - 1 tokens of one document."""

    index: int  # running index of this context within its split
    doc: int  # index of the document in the source
    tokens: list[int]


def contexts(
    docs: Iterator[str],
    tokenizer,
    bos: int,
    split: str,
    context_length: int,
    eval_fraction: float,
    seed: int,
    min_tokens: int = 2,
    per_document: int | None = None,
) -> Iterator[Context]:
    """Deterministic stream of contexts from the documents of one split.

    Each document is tokenized without special tokens and cut into pieces of context_length - 1
    tokens, each piece prefixed with BOS; a trailing piece shorter than min_tokens is dropped.
    Contexts never span documents, so document ids and positions stay meaningful. With `per_document`,
    only a document's first `per_document` contexts are kept: more documents for the same tokens, which
    is what a bootstrap over documents needs (one long source file would otherwise fill a split).
    """
    if context_length < 2:
        raise DictlabError(f"context_length must be at least 2, got {context_length}")
    step = context_length - 1
    index = 0
    for doc_id, text in enumerate(docs):
        if split_of(doc_id, eval_fraction, seed) != split or not text:
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if per_document is not None:
            ids = ids[: per_document * step]
        for start in range(0, len(ids), step):
            piece = ids[start : start + step]
            if len(piece) < min_tokens:
                continue
            yield Context(index, doc_id, [bos] + piece)
            index += 1
