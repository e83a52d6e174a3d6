"""Content hashes of local files a cache key depends on, remembered by file identity.

A key must change when a file's bytes change (weights saved over with a same-size file must not
leave old samples looking current), yet a 54 GB model folder cannot be re-read on every run. So
each file's sha256 is kept in `<cache>/digests.json` under its path, with the size, mtime (ns),
inode and device it had: a file whose stat still matches is not read again; any write changes its
mtime and so forces a fresh hash.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

_CACHE_NAME = "digests.json"


def cache_dir() -> Path:
    """retrace's cache: $RETRACE_CACHE, else ~/.cache/retrace."""
    return Path(os.environ.get("RETRACE_CACHE") or Path.home() / ".cache" / "retrace")


def _identity(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]


def _read_cache(path: Path) -> dict[str, list]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_digests(paths: Iterable[Path], remember: bool = True) -> list[str]:
    """The sha256 of each file, read only when its stat changed since it was last hashed
    (`remember=False`: read every file, keep nothing; for files just written)."""
    if not remember:
        return [sha256_file(Path(p)) for p in paths]
    cache_file = cache_dir() / _CACHE_NAME
    cache = _read_cache(cache_file)
    found, changed = [], False
    for p in paths:
        name = str(Path(p).resolve())
        ident = _identity(os.stat(name))
        entry = cache.get(name)
        if entry is None or entry[:4] != ident:
            entry = [*ident, sha256_file(Path(name))]
            cache[name], changed = entry, True
        found.append(entry[4])
    if changed:
        # Merged with what another process wrote meanwhile (a lost entry costs a re-read only);
        # files that are gone are forgotten, so the cache does not grow with temporary folders.
        merged = {
            name: entry
            for name, entry in {**_read_cache(cache_file), **cache}.items()
            if os.path.exists(name)
        }
        tmp = cache_file.with_name(f".{_CACHE_NAME}.tmp-{os.getpid()}")
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(merged))
            os.replace(tmp, cache_file)
        except OSError:
            pass  # a read-only cache only means hashing again next run
    return found


def hash_files(paths: list[Path], root: Path | None = None, remember: bool = True) -> str:
    """One hash over the files' contents in order (and their names relative to `root`)."""
    h = hashlib.sha256()
    for p, digest in zip(paths, file_digests(paths, remember), strict=True):
        if root is not None:
            h.update(str(Path(p).relative_to(root)).encode() + b"\0")
        h.update(digest.encode())
    return h.hexdigest()
