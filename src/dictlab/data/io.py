"""Atomic file writes: an artifact appears under its final name only once it is complete."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path

from dictlab.errors import DictlabError, DiskFull


@contextmanager
def atomic_path(final: Path):
    """Yield a temporary path beside `final`; on success fsync it and rename it into place.

    On any failure the temporary file is removed, so a later run never sees a half-written file.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        dir_fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise DiskFull(f"disk full while writing {final}; nothing was left behind") from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_folder(final: Path, overwrite: bool = False):
    """Yield a temporary folder beside `final`; on success it replaces `final` (refused when `final` holds
    files, unless `overwrite`). On any failure the temporary folder is removed and `final` is untouched."""
    import shutil

    final = Path(final)
    if final.exists() and (not final.is_dir() or any(final.iterdir())) and not overwrite:
        raise DictlabError(f"{final} already exists and is not empty; choose another folder, or replace it (--force)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final) if final.is_dir() else final.unlink()
        os.replace(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise DiskFull(f"disk full while writing {final}; nothing was left behind") from e
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def json_text(obj) -> str:
    """How every JSON artifact is written: indented, keys sorted, a final newline."""
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def write_json(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json_text(obj))


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def sha256_file(path: Path | str, opener=open) -> str:
    """The sha256 of a file, read in 1 MiB chunks; `opener` opens it (e.g. an fsspec filesystem's open)."""
    h = hashlib.sha256()
    with opener(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def config_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]
