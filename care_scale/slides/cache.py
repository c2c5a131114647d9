"""A bounded local staging cache for remote slides (s3://, gs://, https://, ...).

cuCIM and OpenSlide read local files only, and whole-slide formats are read at random offsets,
so a remote slide is copied to local disk first. The cache:

- is bounded (``max_bytes``): least-recently-used entries are evicted before a new download,
  never an entry that is open right now;
- verifies every entry against the remote size and ETag (a changed object is downloaded again;
  a download whose size, or single-part MD5 ETag, does not match is discarded);
- downloads with a few concurrent ranged GETs (``num_threads`` x ``chunk_bytes``);
- can delete an entry as soon as its slide is closed (``remove_after_use``);
- can be shared by several processes on one machine (a file lock guards eviction/commit);
- never puts credentials into exceptions or logs (URIs pass through ``redact``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from care_scale.exceptions import SlideNotFoundError, StorageError
from care_scale.storage import network_failure, redact, strip_file_scheme, url_to_fs, write_text

_MIB = 1 << 20


@dataclass(frozen=True)
class CacheEntry:
    path: Path  # the staged local file
    size: int
    etag: str | None


def _filesystem(uri: str, storage_options: dict[str, Any] | None):

    if "@" in urlsplit(uri).netloc:
        # Refused before any library sees it: they would log or echo the secret part.
        raise StorageError(f"{redact(uri)}: credentials inside the URI are not accepted; pass "
                           "them as storage options or via the standard AWS chain")
    try:
        fs, path = url_to_fs(uri, storage_options)
    except (ValueError, ImportError) as exc:
        raise StorageError(f"{redact(uri)}: cannot open filesystem ({redact(exc)})") from None
    # A fresh instance per call would be cheap, but fsspec caches instances anyway.
    return fs, path


def remote_errors() -> tuple[type[BaseException], ...]:
    """Exceptions fsspec filesystems raise for network/auth trouble (s3fs leaks botocore's)."""
    errors: list[type[BaseException]] = [OSError, ValueError, TimeoutError]
    try:
        from botocore.exceptions import BotoCoreError, ClientError

        errors += [BotoCoreError, ClientError]
    except ImportError:
        pass
    try:
        from aiohttp import ClientError as AioHttpClientError

        errors.append(AioHttpClientError)
    except ImportError:
        pass
    return tuple(errors)


def stat_uri(uri: str, *, storage_options: dict[str, Any] | None = None
             ) -> tuple[int, str | None]:
    """(size in bytes, ETag or None) of a local path or fsspec URI, without reading it."""
    from care_scale.storage import is_remote

    if not is_remote(uri):
        path = strip_file_scheme(str(uri))
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise SlideNotFoundError(redact(uri)) from None
        return int(st.st_size), None
    fs, path = _filesystem(uri, storage_options)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise SlideNotFoundError(redact(uri)) from None
    except remote_errors() as exc:
        why = network_failure(exc, uri, fs, "looking up")
        raise StorageError(f"cannot stat: {why}" if why else
                           f"{redact(uri)}: cannot stat ({type(exc).__name__}: "
                           f"{redact(exc)})") from None
    if info.get("type") == "directory":
        raise SlideNotFoundError(redact(uri), "is a directory, not a slide file")
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
    return int(info.get("size") or 0), (str(etag).strip('"') if etag else None)


def _companions(uri: str, storage_options: dict[str, Any] | None
                ) -> list[tuple[str, str, int, str | None]]:
    """(remote URI, path relative to the entry, size, ETag) of files the slide needs."""
    suffix = PurePosixPath(uri.split("?", 1)[0]).suffix.lower()
    if suffix not in (".mrxs", ".dcm"):
        return []
    fs, path = _filesystem(uri, storage_options)
    protocol = uri.split("://", 1)[0]
    p = PurePosixPath(path)
    try:
        if suffix == ".mrxs":
            base = str(p.with_suffix(""))
            found = fs.find(base, detail=True)
            items = [(f, str(PurePosixPath(p.stem) / PurePosixPath(f).relative_to(base)), i)
                     for f, i in found.items()]
        else:
            found = fs.glob(str(p.parent / "*.dcm"), detail=True)
            items = [(f, PurePosixPath(f).name, i) for f, i in found.items() if f != path]
    except remote_errors() as exc:
        raise StorageError(f"{redact(uri)}: cannot list companion files ({type(exc).__name__}: "
                           f"{redact(exc)})") from None
    out = []
    for f, rel, info in sorted(items):
        etag = info.get("ETag") or info.get("etag")
        out.append((f"{protocol}://{f}", rel, int(info.get("size") or 0),
                    str(etag).strip('"') if etag else None))
    return out


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class SlideCache:
    """Stage remote slide files in ``root``, keeping the total under ``max_bytes``."""

    def __init__(self, root: str | os.PathLike, *, max_bytes: int = 50 * (1 << 30),
                 remove_after_use: bool = False, num_threads: int = 4,
                 chunk_bytes: int = 16 * _MIB, verify_md5: bool = True,
                 wait_seconds: float = 900.0):
        if max_bytes <= 0:
            raise StorageError(f"SlideCache max_bytes must be positive, got {max_bytes}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes)
        self.remove_after_use = remove_after_use
        self.num_threads = max(1, int(num_threads))
        self.chunk_bytes = max(_MIB // 4, int(chunk_bytes))
        self.verify_md5 = verify_md5
        # How long to wait for another process that is downloading the same slide.
        self.wait_seconds = float(wait_seconds)
        self._in_use: dict[Path, int] = {}
        self._mutex = threading.Lock()

    # ---- public ------------------------------------------------------------------------------
    def fetch(self, uri: str, *, storage_options: dict[str, Any] | None = None) -> CacheEntry:
        """Local copy of ``uri`` (downloaded unless a verified copy is cached); pins it.

        Multi-file formats come with their companions: MRXS with its data folder of the same
        name, DICOM WSI with the other ``.dcm`` files of its folder.
        """
        size, etag = stat_uri(uri, storage_options=storage_options)
        companions = _companions(uri, storage_options)
        total = size + sum(c[2] for c in companions)
        if total > self.max_bytes:
            raise StorageError(f"{redact(uri)}: {total} bytes does not fit in the slide cache "
                               f"(max_bytes={self.max_bytes})")
        entry_dir = self.root / self._key(uri)
        name = Path(strip_file_scheme(uri).split("?", 1)[0]).name or "slide"
        target = entry_dir / name
        files = {name: size, **{rel: n for _, rel, n, _ in companions}}
        deadline = time.monotonic() + self.wait_seconds
        while True:
            with self._lock():
                meta = self._read_meta(entry_dir)
                if meta and meta.get("complete") and meta.get("etag") == etag \
                        and meta.get("files") == files and self._files_ok(entry_dir, files):
                    self._touch(entry_dir)
                    self._pin(target)
                    return CacheEntry(target, size, etag)
                in_progress = meta and not meta.get("complete") and \
                    time.time() - self._last_used(entry_dir) < self.wait_seconds
                if not in_progress or time.monotonic() > deadline:
                    # Stale or missing: drop the old copy, make room, download outside the lock.
                    shutil.rmtree(entry_dir, ignore_errors=True)
                    self._evict(total)
                    entry_dir.mkdir(parents=True, exist_ok=True)
                    # Reserve the space so concurrent fetches do not overfill the cache.
                    self._write_meta(entry_dir, {"size": total, "etag": etag, "files": files,
                                                 "complete": False})
                    self._pin(target)
                    break
            time.sleep(0.2)  # another process is downloading this slide: wait for it
        try:
            self._download(uri, storage_options, target, size, etag)
            for remote, rel, n, c_etag in companions:
                dest = entry_dir / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                self._download(remote, storage_options, dest, n, c_etag)
        except BaseException:
            self._unpin(target)
            shutil.rmtree(entry_dir, ignore_errors=True)
            raise
        with self._lock():
            self._write_meta(entry_dir, {"size": total, "etag": etag, "files": files,
                                         "complete": True, "uri": redact(uri)})
            self._touch(entry_dir)
        return CacheEntry(target, size, etag)

    @staticmethod
    def _files_ok(entry_dir: Path, files: dict[str, int]) -> bool:
        for rel, n in files.items():
            p = entry_dir / rel
            if not p.is_file() or p.stat().st_size != n:
                return False
        return True

    def release(self, path: str | os.PathLike) -> None:
        """The slide staged at ``path`` is closed; delete it if ``remove_after_use``."""
        path = Path(path)
        left = self._unpin(path)
        if self.remove_after_use and left == 0:
            with self._lock():
                shutil.rmtree(path.parent, ignore_errors=True)

    def total_bytes(self) -> int:
        return sum(self._entry_size(d) for d in self._entries())

    def entries(self) -> list[Path]:
        """Staged files, least recently used first."""
        out = []
        for d in sorted(self._entries(), key=self._last_used):
            names = list((self._read_meta(d) or {}).get("files") or {})
            if names and (d / names[0]).is_file():
                out.append(d / names[0])  # the slide file; companions live beside it
        return out

    def clear(self) -> None:
        with self._lock():
            for d in self._entries():
                if not self._pinned_dir(d):
                    shutil.rmtree(d, ignore_errors=True)

    # ---- internals ---------------------------------------------------------------------------
    @staticmethod
    def _key(uri: str) -> str:
        # Query strings may carry signatures: key on the URI without them.
        return hashlib.sha256(str(uri).split("?", 1)[0].encode()).hexdigest()[:24]

    @contextlib.contextmanager
    def _lock(self):
        with self._mutex, open(self.root / ".lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _entries(self) -> list[Path]:
        return [d for d in self.root.iterdir() if d.is_dir() and (d / ".meta.json").exists()]

    @staticmethod
    def _read_meta(entry_dir: Path) -> dict | None:
        try:
            return json.loads((entry_dir / ".meta.json").read_text())
        except (OSError, ValueError):
            return None

    @staticmethod
    def _write_meta(entry_dir: Path, meta: dict) -> None:
        write_text(entry_dir / ".meta.json", json.dumps(meta))

    def _entry_size(self, entry_dir: Path) -> int:
        meta = self._read_meta(entry_dir) or {}
        return int(meta.get("size") or 0)

    @staticmethod
    def _touch(entry_dir: Path) -> None:
        os.utime(entry_dir / ".meta.json", (time.time(), time.time()))

    @staticmethod
    def _last_used(entry_dir: Path) -> float:
        try:
            return (entry_dir / ".meta.json").stat().st_mtime
        except OSError:
            return 0.0

    # Pins: an open slide's entry must not be evicted, by this process or by another worker
    # process sharing the cache folder. Each process marks the entries it holds open with a
    # ``.pin-<pid>`` file; pins of processes that no longer exist are ignored and removed.
    def _pin(self, path: Path) -> None:
        self._in_use[path] = self._in_use.get(path, 0) + 1
        if path.parent.is_dir():
            (path.parent / f".pin-{os.getpid()}").touch()

    def _unpin(self, path: Path) -> int:
        with self._mutex:
            left = self._in_use.get(path, 0) - 1
            if left <= 0:
                self._in_use.pop(path, None)
                (path.parent / f".pin-{os.getpid()}").unlink(missing_ok=True)
                return 0
            self._in_use[path] = left
            return left

    def _pinned_dir(self, entry_dir: Path) -> bool:
        if any(p.parent == entry_dir for p in self._in_use):
            return True
        for pin in entry_dir.glob(".pin-*"):
            pid = int(pin.name.split("-", 1)[1]) if pin.name[5:].isdigit() else -1
            if pid == os.getpid():
                continue  # ours, but not in _in_use: left over from a released slide
            if pid > 0 and _process_alive(pid):
                return True
            pin.unlink(missing_ok=True)
        return False

    def _evict(self, incoming: int) -> None:
        """Delete least-recently-used, unpinned entries until ``incoming`` bytes fit."""
        entries = sorted(self._entries(), key=self._last_used)
        total = sum(self._entry_size(d) for d in entries)
        for d in entries:
            if total + incoming <= self.max_bytes:
                return
            meta = self._read_meta(d) or {}
            downloading = not meta.get("complete") and \
                time.time() - self._last_used(d) < self.wait_seconds
            if self._pinned_dir(d) or downloading:
                continue
            total -= self._entry_size(d)
            shutil.rmtree(d, ignore_errors=True)
        if total + incoming > self.max_bytes:
            raise StorageError(
                f"slide cache {self.root} is full: {total} bytes in use by open slides, "
                f"{incoming} more needed, max_bytes={self.max_bytes}")

    def _download(self, uri: str, storage_options: dict[str, Any] | None, target: Path,
                  size: int, etag: str | None) -> None:
        fs, path = _filesystem(uri, storage_options)
        part = target.parent / f".part-{uuid.uuid4().hex}"
        ranges = [(s, min(s + self.chunk_bytes, size)) for s in range(0, size, self.chunk_bytes)]
        try:
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.ftruncate(fd, size)

                def get(rng: tuple[int, int]) -> None:
                    data = fs.cat_file(path, start=rng[0], end=rng[1])
                    if len(data) != rng[1] - rng[0]:
                        raise StorageError(
                            f"{redact(uri)}: short read {len(data)} bytes at {rng[0]}")
                    os.pwrite(fd, data, rng[0])

                with ThreadPoolExecutor(min(self.num_threads, max(1, len(ranges)))) as pool:
                    list(pool.map(get, ranges))
            finally:
                os.close(fd)
        except StorageError:
            part.unlink(missing_ok=True)
            raise
        except FileNotFoundError:
            part.unlink(missing_ok=True)
            raise SlideNotFoundError(redact(uri)) from None
        except remote_errors() as exc:
            part.unlink(missing_ok=True)
            why = network_failure(exc, uri, fs, "reading")
            raise StorageError(f"download failed: {why}" if why else
                               f"{redact(uri)}: download failed ({type(exc).__name__}: "
                               f"{redact(exc)})") from None
        self._verify(uri, part, size, etag)
        os.replace(part, target)

    def _verify(self, uri: str, part: Path, size: int, etag: str | None) -> None:
        got = part.stat().st_size
        if got != size:
            part.unlink(missing_ok=True)
            raise StorageError(f"{redact(uri)}: staged {got} bytes, expected {size}")
        # A single-part S3 ETag is the MD5 of the object; multipart ETags ("...-N") are not.
        if self.verify_md5 and etag and len(etag) == 32 and "-" not in etag:
            md5 = hashlib.md5(usedforsecurity=False)
            with open(part, "rb") as fh:
                for block in iter(lambda: fh.read(8 * _MIB), b""):
                    md5.update(block)
            if md5.hexdigest() != etag.lower():
                part.unlink(missing_ok=True)
                raise StorageError(f"{redact(uri)}: checksum mismatch (MD5 {md5.hexdigest()} "
                                   f"!= ETag {etag})")
