"""Sharded activation store, on local disk or any fsspec filesystem, and a reader that streams batches.

Layout of a store (a local folder, or a URL such as memory://, s3:// or gs:// when that filesystem's
package is installed):

    spec.json                       what the store is for (model, corpus, extraction config);
                                    written first, so a resumed run can check it matches
    train/shard-00000.safetensors   one tensor per site ([rows, d_model]) plus per-row `token`,
    eval/shard-00000.safetensors    `doc` (document index), `context` and `pos` (position in context)
    train/rank-00001-of-00004/...   the same, one folder per rank, when N ranks extracted it
    manifest.json                   written last: the store is complete only when it exists; it lists
                                    every shard (rank by rank)

A local file is written under a temporary name, fsynced and renamed, so a shard on disk is whole; on an
object store a put is whole by itself. Local shards are read through memory maps; remote ones by byte
ranges of the tensors asked for. Reading runs a shard ahead on a background thread.
"""

from __future__ import annotations

import errno
import hashlib
import json
import posixpath
import re
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from safetensors.torch import save_file

from dictlab.data.distributed import RankSource, World, check_shards
from dictlab.data.integrity import check_local, read_verified, tensor_at, verified_before, verify_on_read
from dictlab.data.io import atomic_path, config_hash, json_text, sha256_file, write_json
from dictlab.errors import DictlabError, DiskFull

SPLITS = ("train", "eval")
ROW_COLUMNS = ("token", "doc", "context", "pos")
_SHARD = re.compile(r"shard-(\d{5})\.safetensors")
_RANK_FOLDER = re.compile(r"rank-(\d{5})-of-(\d{5})")


class Location:
    """A store's folder on some filesystem; paths below it are '/'-separated relative names."""

    def __init__(self, url: str | Path):
        self.url = str(url)
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.local = isinstance(self.fs, LocalFileSystem)

    def path(self, rel: str = "") -> str:
        return posixpath.join(self.root, rel) if rel else self.root

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def read_json(self, rel: str):
        return json.loads(self.fs.cat_file(self.path(rel)))

    def write_json(self, rel: str, obj) -> None:
        if self.local:
            write_json(Path(self.path(rel)), obj)
        else:
            self._put(rel, json_text(obj).encode())

    def _put(self, rel: str, data: bytes) -> None:
        """Write a remote object whole (an object store's put is whole or nothing)."""
        try:
            self.fs.pipe_file(self.path(rel), data)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise DiskFull(f"no space left while writing {self.url}/{rel} ({len(data):,} bytes); nothing was "
                               "left behind") from e
            raise

    def names(self, rel: str) -> list[str]:
        """Names of the entries in a folder (none when it does not exist)."""
        try:
            return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.path(rel), detail=False))
        except FileNotFoundError:
            return []

    def size(self, rel: str) -> int:
        return self.fs.size(self.path(rel))

    def sha256(self, rel: str) -> str:
        return sha256_file(self.path(rel), self.fs.open)

    def header(self, rel: str) -> tuple[dict, int]:
        """A safetensors file's header ({tensor: {dtype, shape, data_offsets}, __metadata__: {...}}) and
        where its data starts."""
        path = self.path(rel)
        n = struct.unpack("<Q", self.fs.cat_file(path, start=0, end=8))[0]
        return json.loads(self.fs.cat_file(path, start=8, end=8 + n)), 8 + n

    def read(self, rel: str, names: list[str]) -> dict[str, torch.Tensor]:
        """Some tensors of a safetensors file: by memory map locally, else by the byte range of each."""
        if self.local:
            with safe_open(self.path(rel), framework="pt") as f:
                return {name: f.get_tensor(name) for name in names}
        path, (header, base) = self.path(rel), self.header(rel)
        out = {}
        for name in names:
            start, end = header[name]["data_offsets"]
            data = self.fs.cat_file(path, start=base + start, end=base + end) if end > start else b""
            out[name] = tensor_at(header[name], bytearray(data))
        return out

    def write_tensors(self, rel: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
        """Write a safetensors file whole; returns its sha256 (hashed from the page cache locally, from
        the bytes before they leave for an object store)."""
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        if self.local:
            with atomic_path(Path(self.path(rel))) as tmp:
                save_file(tensors, str(tmp), metadata=metadata)
            return self.sha256(rel)
        data = safetensors_bytes(tensors, metadata=metadata)
        self.fs.makedirs(posixpath.dirname(self.path(rel)), exist_ok=True)
        self._put(rel, data)
        return hashlib.sha256(data).hexdigest()


def shard_folder(split: str, rank: int = 0, ranks: int = 1) -> str:
    """Where one rank writes a split's shards: the split's folder itself for a single process."""
    return split if ranks == 1 else f"{split}/rank-{rank:05d}-of-{ranks:05d}"


def shard_name(folder: str, index: int) -> str:
    return f"{folder}/shard-{index:05d}.safetensors"


def write_shard(loc: Location, rel: str, tensors: dict[str, torch.Tensor], contexts: int) -> None:
    """A shard, then beside it its manifest entry (rows, contexts, sha256, documents), so that merging
    the manifest needs no pass over the shards: each writer hashes its own, while extraction goes on."""
    sha = loc.write_tensors(rel, tensors, {"contexts": str(contexts)})
    loc.write_json(_entry_name(rel), {"file": rel, "rows": tensors["token"].shape[0], "contexts": contexts,
                                      "sha256": sha, "docs": tensors["doc"].unique().tolist()})


def _entry_name(rel: str) -> str:
    return rel.removesuffix(".safetensors") + ".json"


def shard_entry(loc: Location, rel: str) -> dict:
    """A shard's manifest entry: from the file written beside it, else (a run stopped between the two
    writes, or a store from before them) from the shard itself, and then written beside it."""
    if loc.exists(_entry_name(rel)):
        entry = loc.read_json(_entry_name(rel))
        if entry.get("file") == rel:
            return entry
    contexts, rows = shard_counts(loc, rel)
    entry = {"file": rel, "rows": rows, "contexts": contexts, "sha256": loc.sha256(rel),
             "docs": loc.read(rel, ["doc"])["doc"].unique().tolist()}
    loc.write_json(_entry_name(rel), entry)
    return entry


def complete_shards(loc: Location, folder: str) -> list[str]:
    """The whole shards of a folder, numbered 0..n-1 without gaps; stray temporary files are removed."""
    names = loc.names(folder)
    if loc.local:
        for stray in (n for n in names if n.startswith(".shard-") and ".tmp-" in n):
            Path(loc.path(f"{folder}/{stray}")).unlink(missing_ok=True)
    shards = []
    for i, name in enumerate(sorted(n for n in names if _SHARD.fullmatch(n))):
        if name != f"shard-{i:05d}.safetensors":
            break
        shards.append(f"{folder}/{name}")
    return shards


def rank_folders(loc: Location, split: str) -> dict[int, list[str]]:
    """The rank folders of a split, by the number of ranks that wrote them."""
    found: dict[int, list[str]] = {}
    for name in loc.names(split):
        m = _RANK_FOLDER.fullmatch(name)
        if m:
            found.setdefault(int(m.group(2)), []).append(f"{split}/{name}")
    return found


def shard_counts(loc: Location, rel: str) -> tuple[int, int]:
    """(contexts, rows) of a shard, from its header alone."""
    header, _ = loc.header(rel)
    return int(header["__metadata__"]["contexts"]), header["token"]["shape"][0]


class Store:
    """A complete store: `Store(path).batches(site, split, batch_size)` streams float32 rows."""

    def __init__(self, path: str | Path, verify: bool | None = None):
        """`verify`: check every shard read against the manifest's sha256 (default: on, unless
        DICTLAB_NO_VERIFY=1; see integrity.py)."""
        self.path = path
        self.verify_reads = verify_on_read() if verify is None else verify
        self.loc = Location(path)
        if not self.loc.exists("manifest.json"):
            hint = " (an unfinished extraction: rerun the same extract command to resume)" if (
                self.loc.exists("spec.json")
            ) else ""
            raise DictlabError(f"{path} is not a complete activation store: no manifest.json{hint}")
        self.manifest = self.loc.read_json("manifest.json")
        self.sites: dict[str, int] = self.manifest["sites"]

    @property
    def identity(self) -> str:
        """A hash of what the store was extracted from: results computed on it record this."""
        return config_hash(self.manifest["spec"])

    @property
    def model_dtype(self) -> str:
        """The dtype the model ran in for this store (chosen when the config said auto): later stages that
        run the model (CE, logit lens) use it too."""
        return self.manifest.get("precision", {}).get("model_dtype") or self.manifest["spec"]["extract"]["model_dtype"]

    def d_model(self, site: str) -> int:
        return self.sites[self._site(site)]

    def rows(self, split: str, world: World | None = None, shard_rows: slice | None = None) -> int:
        """Rows of a split, or of the shards one rank reads, or of a slice of every shard (see `batches`)."""
        if world is None and shard_rows is None:
            return self.manifest["splits"][split]["rows"]
        shards = self.manifest["splits"][split]["shards"]
        kept = slice(None) if shard_rows is None else shard_rows
        return sum(len(range(shards[i]["rows"])[kept]) for i in self._rank_shards(split, world))

    def _rank_shards(self, split: str, world: World | None) -> list[int]:
        """Positions in the manifest of the shards a rank reads: rank, rank + N, ... (all without `world`)."""
        n = len(self.shards(split))
        if world is None:
            return list(range(n))
        check_shards(n, world, f"the {split} split of {self.path}")
        return list(range(world.rank, n, world.size))

    def _site(self, site: str) -> str:
        if site not in self.sites:
            raise DictlabError(f"site {site!r} is not in store {self.path}; it holds: {', '.join(self.sites)}")
        return site

    def shards(self, split: str) -> list[str]:
        """The shards of a split, as names relative to the store."""
        if split not in SPLITS:
            raise DictlabError(f"unknown split {split!r}; accepted: {', '.join(SPLITS)}")
        return [s["file"] for s in self.manifest["splits"][split]["shards"]]

    def _chunks(self, site: str, split: str, columns: tuple[str, ...], shuffle: bool, seed: int,
                world: World | None, shard_rows: slice | None = None):
        """Yield dicts of tensors, a shard at a time (its `shard_rows` only; permuted when shuffling), the
        next shard read on a background thread meanwhile."""
        shards = self.shards(split)
        mine = self._rank_shards(split, world)
        g = torch.Generator().manual_seed(seed)
        order = [mine[j] for j in torch.randperm(len(mine), generator=g).tolist()] if shuffle else mine
        names = [site, *columns]
        entries = self.manifest["splits"][split]["shards"]

        def read(i: int) -> dict[str, torch.Tensor]:
            path, sha = self.loc.path(shards[i]), entries[i]["sha256"]
            if self.verify_reads and not (self.loc.local and verified_before(path, sha)):
                if not self.loc.local:
                    return read_verified(self.loc.fs, path, names, sha, self.path, shards[i])
                check_local(path, sha, self.path, shards[i])
            return self.loc.read(shards[i], names)

        with ThreadPoolExecutor(max_workers=1) as pool:
            ahead = pool.submit(read, order[0]) if order else None
            for n, i in enumerate(order):
                tensors = ahead.result()
                ahead = pool.submit(read, order[n + 1]) if n + 1 < len(order) else None
                chunk = {"x": tensors[site], **{c: tensors[c] for c in columns}}
                if shard_rows is not None:
                    chunk = {k: v[shard_rows] for k, v in chunk.items()}
                if shuffle:
                    perm = torch.randperm(chunk["x"].shape[0], generator=g)
                    chunk = {k: v[perm] for k, v in chunk.items()}
                yield chunk

    def source(self, site: str, split: str = "train", batch_size: int = 4096, world: World | None = None):
        """A batch source of one split for the learners: a RankSource of this rank's shards with `world`."""
        source = lambda: self.batches(site, split, batch_size, world=world)  # noqa: E731
        return source if world is None else RankSource(source, world)

    def batches(
        self,
        site: str,
        split: str = "train",
        batch_size: int = 4096,
        shuffle: bool = False,
        seed: int = 0,
        columns: tuple[str, ...] = (),
        max_rows: int | None = None,
        world: World | None = None,
        shard_rows: slice | None = None,
    ) -> Iterator[torch.Tensor | dict[str, torch.Tensor]]:
        """Batches of `batch_size` rows (the last may be short) as float32 [B, d_model].

        With `columns` (any of token, doc, context, pos, or another site: the same rows there, as a
        transcoder needs) each batch is a dict with `x` and those.
        Memory is two shards plus one batch. Shuffling permutes shard order and rows within a shard.
        With `world`, only this rank's shards are read: those at positions rank, rank + N, ... of the
        manifest (N ranks), the same ones every epoch. With `shard_rows`, only those rows of each shard
        (before shuffling): e.g. slice(0, 64) and slice(64, None) split every shard in two.
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

        for chunk in self._chunks(site, split, columns, shuffle, seed, world, shard_rows):
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
                if not self.loc.exists(s["file"]):
                    problems.append(f"missing shard {s['file']}")
                    bad = True
                    continue
                if self.loc.sha256(s["file"]) != s["sha256"]:
                    problems.append(f"checksum mismatch in {s['file']}")
                    bad = True
                    continue
                _, rows = shard_counts(self.loc, s["file"])
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
            "bytes": sum(self.loc.size(f) for s in SPLITS for f in self.shards(s)),
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


def split_shards(loc: Location, split: str) -> list[str]:
    """Every complete shard of a split: the split's own, then each rank folder's in rank order."""
    shards = complete_shards(loc, split)
    for folders in rank_folders(loc, split).values():
        for folder in sorted(folders):
            shards += complete_shards(loc, folder)
    return shards


def write_manifest(loc: Location, spec: dict, sites: dict[str, int], dtype: str, extra: dict) -> None:
    splits = {}
    for split in SPLITS:
        shards = []
        docs: set[int] = set()
        for rel in split_shards(loc, split):
            entry = shard_entry(loc, rel)
            docs.update(entry.pop("docs"))
            shards.append(entry)
        splits[split] = {
            "rows": sum(s["rows"] for s in shards),
            "contexts": sum(s["contexts"] for s in shards),
            "documents": len(docs),
            "shards": shards,
        }
    loc.write_json("manifest.json", {"spec": spec, "sites": sites, "dtype": dtype, "splits": splits, **extra})
