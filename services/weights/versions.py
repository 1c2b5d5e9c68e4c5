"""Numbered directories that appear whole or not at all: weight versions and checkpoints.

A root holds ``{prefix}{number:08d}`` directories (``v00000007``, ``step_00000010``) and a
``LATEST`` file naming the newest number. A directory is written into a hidden temporary
directory, fsynced, then renamed into place, so a reader, or a process restarted after
``kill -9``, sees a number either complete or not at all; single files (``LATEST``, manifests)
are replaced the same way. One writer at a time per root: pruning removes the temporary
directories a killed writer left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LATEST_FILE = "LATEST"
_CHUNK = 1 << 20


def fsync_path(path: Path) -> None:
    """fsync a file or directory by path (a directory's fsync makes renames in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a reader sees the old or the new content only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_path(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class VersionedDirs:
    """The numbered directories under ``root``; one counts once its ``marker`` file exists."""

    def __init__(self, root: str | Path, prefix: str, marker: str) -> None:
        self.root = Path(root)
        self.prefix = prefix
        self.marker = marker
        self._name = re.compile(rf"^{re.escape(prefix)}(\d{{8}})$")

    def path(self, number: int) -> Path:
        return self.root / f"{self.prefix}{number:08d}"

    def list(self) -> list[int]:
        """Complete numbers, oldest first (temporary directories are ignored)."""
        if not self.root.is_dir():
            return []
        found = []
        for child in self.root.iterdir():
            m = self._name.match(child.name)
            if m and (child / self.marker).is_file():
                found.append(int(m.group(1)))
        return sorted(found)

    def latest(self) -> int | None:
        """The newest complete number, from ``LATEST`` (falling back to a directory scan)."""
        with contextlib.suppress(FileNotFoundError, ValueError):
            number = int((self.root / LATEST_FILE).read_text().strip())
            if (self.path(number) / self.marker).is_file():
                return number
        numbers = self.list()
        return numbers[-1] if numbers else None

    @contextlib.contextmanager
    def writing(self, number: int) -> Iterator[Path]:
        """A temporary directory to fill; it becomes ``number`` when the block ends cleanly.

        The caller fsyncs what it writes; on an error the temporary directory is removed.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.path(number)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=self.root))
        try:
            yield tmp
            os.rename(tmp, final)
            fsync_path(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        atomic_write_bytes(self.root / LATEST_FILE, f"{number}\n".encode())

    def prune(self, keep: int) -> None:
        """Remove all but the newest ``keep``, and what killed writers left behind.

        A directory is renamed out of sight before it is deleted: a writer killed halfway
        through a deletion leaves a hidden directory (removed by the next prune), never a
        visible number with files missing.
        """
        for number in self.list()[:-keep] if keep > 0 else []:
            trash = self.root / f".trash-{self.path(number).name}-{os.getpid()}"
            try:
                os.rename(self.path(number), trash)
            except FileNotFoundError:
                continue
            shutil.rmtree(trash, ignore_errors=True)
        for leftover in [*self.root.glob(".tmp-*"), *self.root.glob(".trash-*")]:
            shutil.rmtree(leftover, ignore_errors=True)
