"""Durable file writes shared by every role: a reader sees the old file or the new one, never a part (a temporary
name in the same folder, fsync, rename), and a folder built once under its final name (built under a temporary
name, then renamed; a lost race with an identical build is not an error)."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename inside `folder` durable (the folder's entry list reaches the disk)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic_with(path: str | os.PathLike, write: Callable[[Path], None], *, durable: bool = True,
                      sync_dir: bool = False) -> Path:
    """Replace `path` with what `write(tmp_path)` writes: a temporary file beside it (`.NAME.*.tmp`), fsync'ed
    unless `durable=False`, then renamed over `path`; with `sync_dir` the folder is fsync'ed too. A crash leaves
    the old file (and maybe a stale `.tmp`), never a torn one."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        if durable:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)
    return path


def write_atomic(path: str | os.PathLike, data: bytes | str, *, durable: bool = True, sync_dir: bool = False) -> Path:
    """Replace `path` with `data` (str is written as UTF-8) atomically; see `write_atomic_with`."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    return write_atomic_with(path, lambda tmp: tmp.write_bytes(payload), durable=durable, sync_dir=sync_dir)


def build_dir_once(target: str | os.PathLike, build: Callable[[Path], None], marker: str) -> bool:
    """Unless `target/marker` exists: `build(tmp)` into a temporary folder beside `target` (`.tmp-NAME-*`), which
    must write `marker` last, then rename it to `target`. True when this call built it; False when it was there
    already or another process renamed an identical build first."""
    target = Path(target)
    if (target / marker).exists():
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / marker).exists():  # not a lost race with an identical build: a real failure
                raise
            return False
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return True
