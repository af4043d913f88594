"""A damaged shard never yields a number: every shard a stage reads is hashed while its bytes stream in
and checked against the sha256 its store's manifest recorded, before any tensor is taken from it.

A local shard is hashed through a memory map (no copy), then its tensors are read by memory map as
before; a remote one is read once into memory, each chunk hashed as it arrives, and its tensors are views
of those bytes (hashlib releases the GIL, so on the store's read-ahead thread the hash overlaps the
stage's compute). A local shard is verified the first time a process reads it:
later passes of that process (Lloyd iterations, SAE epochs, the next stage of a run) read it by memory
map as before while its size, modification time and inode are those it was verified with, so a fit of
many passes pays for one (bench/verify.py measures it). Remote shards are verified on every read.
A mismatch stops the stage with one line: which shard, what is wrong (missing, truncated, an unreadable
header, or bytes changed), and the command that repairs it.
`DICTLAB_NO_VERIFY=1` (the CLI's `--no-verify`) skips the check and reads as before.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct

import torch

from dictlab.errors import DictlabError

CHUNK = 8 << 20
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


def verify_on_read() -> bool:
    """Whether stores check shards as they are read (on, unless DICTLAB_NO_VERIFY is set to 1)."""
    return os.environ.get("DICTLAB_NO_VERIFY", "") not in ("1", "true", "yes")


_verified: set[tuple] = set()  # (path, size, mtime_ns, inode, sha256) of the local shards verified in this process


def _identity(path: str, st: os.stat_result, sha256: str) -> tuple:
    """What a verified local file is remembered by."""
    return path, st.st_size, st.st_mtime_ns, st.st_ino, sha256


def verified_before(path: str, sha256: str) -> bool:
    """Whether this process has verified the local file at `path`, unchanged since, against `sha256`."""
    try:
        return _identity(path, os.stat(path), sha256) in _verified
    except OSError:
        return False


def repair_hint(store) -> str:
    return f"repair it with `dictlab store repair {store}` (or `dictlab store verify {store}` to list every problem)"


def check_local(path: str, sha256: str, store, rel: str) -> None:
    """Raise unless the local file at `path` hashes to `sha256` (read by memory map); remember it when it does."""
    try:
        st = os.stat(path)  # taken before hashing: a change while it runs is seen on the next read
    except FileNotFoundError:
        raise DictlabError(f"shard {rel} of {store} is missing; {repair_hint(store)}") from None
    size, digest = st.st_size, hashlib.sha256()
    if size:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            for start in range(0, size, CHUNK):
                digest.update(view[start:start + CHUNK])
            view.release()
    if digest.hexdigest() != sha256:
        with open(path, "rb") as f:
            raise DictlabError(f"shard {rel} of {store}: {_what_is_wrong(bytearray(f.read()))}; {repair_hint(store)}")
    _verified.add(_identity(path, st, sha256))


def read_verified(fs, path: str, names: list[str], sha256: str, store, rel: str) -> dict[str, torch.Tensor]:
    """The tensors `names` of the (remote) safetensors file at `path`, after its bytes matched `sha256`."""
    try:
        size = fs.size(path)
    except FileNotFoundError:
        raise DictlabError(f"shard {rel} of {store} is missing; {repair_hint(store)}") from None
    data = bytearray(size)
    view, digest, done = memoryview(data), hashlib.sha256(), 0
    with fs.open(path, "rb") as f:
        while done < size:
            n = f.readinto(view[done:done + CHUNK])
            if not n:
                break
            digest.update(view[done:done + n])
            done += n
    if done != size or digest.hexdigest() != sha256:
        raise DictlabError(f"shard {rel} of {store}: {_what_is_wrong(data[:done])}; {repair_hint(store)}")
    header, base = _header(data)
    return {name: tensor_at(header[name], data, base + header[name]["data_offsets"][0]) for name in names}


def tensor_at(info: dict, data: bytearray, offset: int = 0) -> torch.Tensor:
    """The tensor of a safetensors header entry, as a view of `data`, whose bytes start at `offset`."""
    start, end = info["data_offsets"]
    dtype = DTYPES[info["dtype"]]
    count = (end - start) // dtype.itemsize
    flat = torch.frombuffer(data, dtype=dtype, count=count, offset=offset) if count else torch.empty(0, dtype=dtype)
    return flat.reshape(info["shape"])


def _header(data: bytearray) -> tuple[dict, int]:
    n = struct.unpack("<Q", bytes(data[:8]))[0]
    return json.loads(bytes(data[8:8 + n])), 8 + n


def _what_is_wrong(data: bytearray) -> str:
    """Why bytes that do not match their recorded sha256 are wrong, as far as they tell."""
    if len(data) < 8:
        return f"truncated to {len(data)} bytes"
    try:
        header, base = _header(data)
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, struct.error) as e:
        return f"its header is unreadable ({type(e).__name__}): the file is truncated or overwritten"
    if len(data) < base + end:
        return f"truncated: {len(data)} bytes where its header needs {base + end}"
    return "its sha256 differs from the one the manifest recorded (bytes changed since extraction)"
