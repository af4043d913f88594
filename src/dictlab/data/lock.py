"""One writer per folder: `dictlab run`, `extract`, `fit` and every command that writes take a lock file
(`.dictlab.lock`: pid, host, command, start time) in the folder they write, created atomically (O_EXCL).
A second writer is refused with one line naming the holder. A lock whose process is gone (same host, no
such pid) is stale: it is taken over with a note. Readers (`report`, `store info`, `store verify`) take
none. Local folders only: a remote (fsspec) store is not locked.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from dictlab.errors import DictlabError

LOCK = ".dictlab.lock"
log = logging.getLogger(__name__)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _holder(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def folder_lock(folder: str | Path, command: str | None = None):
    """Hold the folder's lock for the duration of the block (created when missing; a local folder only)."""
    if "://" in str(folder):
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command or " ".join(sys.argv[:3]),
          "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            held = _holder(path)
            if held and held.get("pid") == me["pid"] and held.get("host") == me["host"]:
                yield  # this process holds it already (a stage inside `run`)
                return
            if held is None and time.time() - path.stat().st_mtime < 5:  # being written by its taker right now
                raise DictlabError(f"{folder} is being locked by another process; try again") from None
            if held and (held.get("host") != me["host"] or _alive(int(held.get("pid", 0)))):
                raise DictlabError(f"{folder} is being written by pid {held['pid']} on {held['host']} "
                                   f"({held.get('command', '?')}, since {held.get('started', '?')}); wait for it to "
                                   f"end or stop it (a lock left by a crash on another host: remove {path})") from None
            log.warning("%s: taking over a stale lock (%s)", folder,
                        "unreadable" if held is None else f"pid {held.get('pid')} is gone")
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        try:
            yield
        finally:
            if (_holder(path) or {}).get("pid") == me["pid"]:
                path.unlink(missing_ok=True)
        return
    raise DictlabError(f"{folder}: could not take the lock {path}")
