"""Sharded activation store on disk, and a reader that streams batches from it.

Layout of a store directory:

    spec.json                       what the store is for (model, corpus, extraction config);
                                    written first, so a resumed run can check it matches
    train/shard-00000.safetensors   one tensor per site ([rows, d_model]) plus per-row `token`,
    eval/shard-00000.safetensors    `doc` (document index), `context` and `pos` (position in context)
    manifest.json                   written last: the store is complete only when it exists

Every file is written under a temporary name, fsynced and renamed, so a shard on disk is whole.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dictlab.errors import DictlabError
from dictlab.io import atomic_path, config_hash, read_json, sha256_file, write_json

SPLITS = ("train", "eval")
ROW_COLUMNS = ("token", "doc", "context", "pos")
_SHARD = re.compile(r"shard-(\d{5})\.safetensors")


def shard_path(store: Path, split: str, index: int) -> Path:
    return Path(store) / split / f"shard-{index:05d}.safetensors"


def write_shard(path: Path, tensors: dict[str, torch.Tensor], contexts: int) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"contexts": str(contexts)})


def complete_shards(store: Path, split: str) -> list[Path]:
    """The whole shards of a split, numbered 0..n-1 without gaps; stray temporary files are removed."""
    folder = Path(store) / split
    if not folder.exists():
        return []
    for stray in folder.glob(".shard-*.tmp-*"):
        stray.unlink(missing_ok=True)
    found = sorted(p for p in folder.iterdir() if _SHARD.fullmatch(p.name))
    shards = []
    for i, p in enumerate(found):
        if p.name != f"shard-{i:05d}.safetensors":
            break
        shards.append(p)
    return shards


def shard_counts(path: Path) -> tuple[int, int]:
    """(contexts, rows) of a shard, from its header alone."""
    with safe_open(str(path), framework="pt") as f:
        contexts = int(f.metadata()["contexts"])
        rows = f.get_slice("token").get_shape()[0]
    return contexts, rows


class Store:
    """A complete store: `Store(path).batches(site, split, batch_size)` streams float32 rows."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest = self.path / "manifest.json"
        if not manifest.exists():
            hint = " (an unfinished extraction: rerun the same extract command to resume)" if (
                self.path / "spec.json"
            ).exists() else ""
            raise DictlabError(f"{self.path} is not a complete activation store: no manifest.json{hint}")
        self.manifest = read_json(manifest)
        self.sites: dict[str, int] = self.manifest["sites"]

    @property
    def identity(self) -> str:
        """A hash of what the store was extracted from: results computed on it record this."""
        return config_hash(self.manifest["spec"])

    def d_model(self, site: str) -> int:
        return self.sites[self._site(site)]

    def rows(self, split: str) -> int:
        return self.manifest["splits"][split]["rows"]

    def _site(self, site: str) -> str:
        if site not in self.sites:
            raise DictlabError(f"site {site!r} is not in store {self.path}; it holds: {', '.join(self.sites)}")
        return site

    def shards(self, split: str) -> list[Path]:
        if split not in SPLITS:
            raise DictlabError(f"unknown split {split!r}; accepted: {', '.join(SPLITS)}")
        return [self.path / s["file"] for s in self.manifest["splits"][split]["shards"]]

    def _chunks(self, site: str, split: str, columns: tuple[str, ...], shuffle: bool, seed: int):
        """Yield dicts of tensors, a shard at a time (rows permuted within it when shuffling)."""
        shards = self.shards(split)
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(shards), generator=g).tolist() if shuffle else range(len(shards))
        for i in order:
            with safe_open(str(shards[i]), framework="pt") as f:
                chunk = {"x": f.get_tensor(site)}
                for c in columns:
                    chunk[c] = f.get_tensor(c)
            if shuffle:
                perm = torch.randperm(chunk["x"].shape[0], generator=g)
                chunk = {k: v[perm] for k, v in chunk.items()}
            yield chunk

    def batches(
        self,
        site: str,
        split: str = "train",
        batch_size: int = 4096,
        shuffle: bool = False,
        seed: int = 0,
        columns: tuple[str, ...] = (),
        max_rows: int | None = None,
    ) -> Iterator[torch.Tensor | dict[str, torch.Tensor]]:
        """Batches of `batch_size` rows (the last may be short) as float32 [B, d_model].

        With `columns` (any of token, doc, context, pos, or another site: the same rows there, as a
        transcoder needs) each batch is a dict with `x` and those.
        Memory is one shard plus one batch. Shuffling permutes shard order and rows within a shard.
        """
        site = self._site(site)
        for c in columns:
            if c not in ROW_COLUMNS and c not in self.sites:
                raise DictlabError(f"unknown column {c!r}; accepted: {', '.join(ROW_COLUMNS + tuple(self.sites))}")
        pending: list[dict[str, torch.Tensor]] = []
        n_pending = 0
        emitted = 0
        limit = max_rows if max_rows is not None else float("inf")

        def emit(parts):
            out = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            for k in ("x", *(c for c in columns if c in self.sites)):
                out[k] = out[k].float()
            return out if columns else out["x"]

        for chunk in self._chunks(site, split, columns, shuffle, seed):
            start = 0
            n = chunk["x"].shape[0]
            while start < n and emitted < limit:
                take = int(min(batch_size - n_pending, n - start, limit - emitted - n_pending))
                pending.append({k: v[start : start + take] for k, v in chunk.items()})
                n_pending += take
                start += take
                if n_pending == batch_size or emitted + n_pending >= limit:
                    yield emit(pending)
                    emitted += n_pending
                    pending, n_pending = [], 0
            if emitted >= limit:
                return
        if pending:
            yield emit(pending)

    def load(self, site: str, split: str = "train", max_rows: int | None = None) -> torch.Tensor:
        """All rows of a split in memory, float32 (for small stores and tests)."""
        return torch.cat(list(self.batches(site, split, batch_size=1 << 16, max_rows=max_rows)))

    def verify(self) -> list[str]:
        """Re-hash every shard and recount rows; returns a list of problems (empty when sound)."""
        problems = []
        for split in SPLITS:
            info = self.manifest["splits"][split]
            total, bad = 0, False
            for s in info["shards"]:
                path = self.path / s["file"]
                if not path.exists():
                    problems.append(f"missing shard {s['file']}")
                    bad = True
                    continue
                if sha256_file(path) != s["sha256"]:
                    problems.append(f"checksum mismatch in {s['file']}")
                    bad = True
                    continue
                _, rows = shard_counts(path)
                if rows != s["rows"]:
                    problems.append(f"{s['file']} holds {rows} rows, manifest says {s['rows']}")
                total += rows
            if not bad and total != info["rows"]:
                problems.append(f"{split} holds {total} rows, manifest says {info['rows']}")
        return problems

    def info(self) -> dict:
        m = self.manifest
        return {
            "path": str(self.path),
            "model": m["spec"]["model"],
            "sites": self.sites,
            "dtype": m["dtype"],
            "rows": {s: m["splits"][s]["rows"] for s in SPLITS},
            "shards": {s: len(m["splits"][s]["shards"]) for s in SPLITS},
            "documents": {s: m["splits"][s]["documents"] for s in SPLITS},
            "bytes": sum(p.stat().st_size for s in SPLITS for p in self.shards(s)),
        }


def select_rows(batches: Iterator, rows: torch.Tensor) -> Iterator[tuple]:
    """From a stream of row batches (tensors, or dicts of columns), the rows at the given sorted global
    indices: (indices, rows) per batch that holds any. One pass, memory one batch."""
    offset = 0
    for batch in batches:
        n = (batch["x"] if isinstance(batch, dict) else batch).shape[0]
        lo, hi = torch.searchsorted(rows, torch.tensor([offset, offset + n])).tolist()
        if hi > lo:
            local = rows[lo:hi] - offset
            yield rows[lo:hi], ({k: v[local] for k, v in batch.items()} if isinstance(batch, dict) else batch[local])
        offset += n


def write_manifest(store: Path, spec: dict, sites: dict[str, int], dtype: str, extra: dict) -> None:
    splits = {}
    for split in SPLITS:
        shards = []
        docs: set[int] = set()
        for path in complete_shards(store, split):
            contexts, rows = shard_counts(path)
            with safe_open(str(path), framework="pt") as f:
                docs.update(f.get_tensor("doc").unique().tolist())
            shards.append(
                {"file": f"{split}/{path.name}", "rows": rows, "contexts": contexts, "sha256": sha256_file(path)}
            )
        splits[split] = {
            "rows": sum(s["rows"] for s in shards),
            "contexts": sum(s["contexts"] for s in shards),
            "documents": len(docs),
            "shards": shards,
        }
    write_json(Path(store) / "manifest.json", {"spec": spec, "sites": sites, "dtype": dtype, "splits": splits, **extra})
