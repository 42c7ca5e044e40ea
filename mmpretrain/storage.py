"""Object storage (``s3://``, ``gs://``, ``hf://``, any fsspec URL): one place for opening, listing,
atomic uploads, retries and the background uploader.

Everything goes through fsspec (s3fs, gcsfs, ...): credentials and endpoints come from where those
libraries read them (``AWS_*`` variables, ``~/.aws``, ``AWS_ENDPOINT_URL``, ``FSSPEC_S3_*``), never from
our configs or logs. Every call that talks to the store goes through :func:`retry`: a transient error (a
timeout, a dropped connection, a 5xx, throttling) is retried with exponential backoff, each retry logged
with this process's running count; one still failing after :data:`ATTEMPTS` tries raises
:class:`StorageError`. botocore's own silent retries are turned off for ``s3://`` so that every retry is
ours and counted.

An upload is atomic for a reader: the object is written under a hidden temporary key beside its name
(``.<name>.tmp-<id>``), then copied to its name and the temporary key removed; a directory (a sharded
checkpoint) is uploaded file by file and gets its ``.complete`` marker last. Readers ignore hidden keys.

The bottom of the package beside :mod:`mmpretrain.io`: imports nothing of mmpretrain but it.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import posixpath
import queue
import random
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from mmpretrain.io import atomic_write

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Tries of one storage call before :class:`StorageError`; the backoff doubles from BACKOFF_S up to
#: BACKOFF_MAX_S, with up to 50% jitter.
ATTEMPTS = int(os.environ.get("MMPRETRAIN_STORAGE_ATTEMPTS", 6))
BACKOFF_S, BACKOFF_MAX_S = 0.2, 10.0
#: The marker a directory upload writes last: without it a remote directory is incomplete.
COMPLETE = ".complete"

_TRANSIENT_ERRNOS = {
    errno.EBUSY,
    errno.EAGAIN,
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.EPIPE,
}
_retries = 0  # retries made by this process (logged with each)
_lock = threading.Lock()


class StorageError(OSError):
    """A storage call that still failed after :data:`ATTEMPTS` tries (or failed for good)."""


def is_remote(url: str | os.PathLike) -> bool:
    """A URL fsspec opens that is no local file (``s3://``, ``gs://``, ``hf://``, ``memory://`` ...);
    ``http(s)://`` and ``pipe:`` streams are read as streams elsewhere, ``file://`` is local."""
    url = str(url)
    if "://" not in url or url.startswith("pipe:"):
        return False
    protocol = url.split("://", 1)[0].lower()
    return protocol not in ("file", "http", "https")


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for a URL (``posixpath.join``: no ``os.sep``)."""
    return posixpath.join(base.rstrip("/"), *parts)


def filesystem(url: str) -> tuple[Any, str]:
    """``(fs, path)`` of a URL: fsspec's cached filesystem for its protocol, with botocore's silent
    retries off for ``s3://`` (ours count them)."""
    import fsspec

    protocol = str(url).split("://", 1)[0].lower()
    options: dict[str, Any] = {}
    if protocol in ("s3", "s3a"):
        options["config_kwargs"] = {"retries": {"total_max_attempts": 1, "mode": "standard"}}
    fs, path = fsspec.core.url_to_fs(str(url), **options)
    if protocol in ("s3", "s3a"):
        fs.retries = 1  # s3fs's own loop for timeouts and dropped connections: ours instead
    return fs, path


def retries_so_far() -> int:
    """Retries of storage calls this process has made."""
    return _retries


def transient(exc: BaseException) -> bool:
    """Whether retrying may help: a timeout, a dropped connection, a 5xx or throttling; not a missing
    object, a refused permission or a malformed request."""
    if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError):
        return False
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:  # s3fs: 503 / SlowDown -> EBUSY
        return True
    chain, cause = [], exc
    while cause is not None and len(chain) < 5:  # s3fs raises OSError from botocore's ClientError
        chain.append(f"{type(cause).__name__} {cause}")
        cause = cause.__cause__ or cause.__context__
    text = " ".join(chain).lower()
    if any(s in text for s in ("nosuchbucket", "nosuchkey", "accessdenied", "invalidbucketname")):
        return False
    if isinstance(exc, TimeoutError | ConnectionError):
        return True
    markers = (
        "timeout", "timed out", "503", "500", "502", "504", "slowdown", "slow down", "throttl",
        "serviceunavailable", "service unavailable", "internalerror", "connection", "reset by peer",
        "incompleteread", "payload", "broken pipe", "server disconnected",
    )  # fmt: skip
    return any(m in text for m in markers)


def retry(call: Callable[[], T], what: str, attempts: int | None = None) -> T:
    """``call()``, retried with exponential backoff (and jitter) while it fails transiently; each retry
    is logged with this process's running count. :class:`StorageError` after the last try."""
    global _retries
    attempts = attempts or ATTEMPTS
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 (classified below; what is not transient is raised as is)
            if not transient(exc):
                raise
            if attempt == attempts:
                raise StorageError(
                    f"{what}: failed {attempts} times, the last: {type(exc).__name__}: {exc}"
                ) from exc
            delay = min(BACKOFF_MAX_S, BACKOFF_S * 2 ** (attempt - 1)) * (1 + 0.5 * random.random())
            with _lock:
                _retries += 1
                n = _retries
            log.warning(
                "storage retry %d (this process): %s failed (%s: %s); try %d of %d in %.1f s",
                n, what, type(exc).__name__, str(exc)[:200], attempt + 1, attempts, delay,
            )  # fmt: skip
            time.sleep(delay)
    raise AssertionError("unreachable")


# -- reading ---------------------------------------------------------------------------------------
class RangedReader:
    """A remote object read by position, bounded memory (fsspec's read-ahead cache of ``block_size``):
    a read at an offset is a ranged GET from there, never a download from the start. A read that
    fails is retried (:func:`retry`) on a freshly opened object at the same position."""

    def __init__(self, url: str, block_size: int = 8 << 20, size: int | None = None):
        self.url, self.block_size = url, block_size
        self.listed = _listed.get(url)
        self._size = size if size is not None else (self.listed or {}).get("size")
        self.fs, self.path = filesystem(url)
        self.f: Any = None
        self.pos = 0

    def _open(self) -> Any:
        if self.f is None:
            known = {"size": self._size} if self._size is not None else {}  # a reopen asks no HEAD again
            self.f = self.fs.open(
                self.path, "rb", block_size=self.block_size, cache_type="readahead", **known
            )
            if self.listed is not None:  # what s3fs would otherwise ask a HEAD for
                try:
                    self.f.details = self.listed
                except AttributeError:  # a file object without listing details
                    pass
            self._size = self.f.size
        return self.f

    def _read_at(self, pos: int, n: int) -> bytes:
        try:
            f = self._open()
            f.seek(pos)
            return f.read(n)
        except Exception:
            self.close()  # the next try reopens
            raise

    def size(self) -> int:
        if self._size is None:
            retry(self._open, f"opening {self.url}")
        return self._size

    def read_at(self, pos: int, n: int) -> bytes:
        return retry(lambda: self._read_at(pos, n), f"reading {n} bytes at {pos} of {self.url}")

    # file-like, for a forward reader (gzip)
    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = max(0, self.size() - self.pos)
        data = self.read_at(self.pos, n)
        self.pos += len(data)
        return data

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if self.f is not None:
            try:
                self.f.close()
            except Exception:  # noqa: BLE001 (a broken connection: nothing left to release)
                pass
            self.f = None

    def __enter__(self) -> RangedReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_bytes(url: str) -> bytes | None:
    """The object's bytes; None when it does not exist."""
    fs, path = filesystem(url)
    try:
        return retry(lambda: fs.cat_file(path), f"reading {url}")
    except FileNotFoundError:
        return None


def listing(url: str) -> dict[str, dict[str, Any]]:
    """``{name: details}`` of the objects (and folders) directly under ``url`` (one listing call); empty
    when it does not exist. ``details`` has fsspec's ``size``, ``type`` and the store's fields
    (``LastModified`` on S3)."""
    fs, path = filesystem(url)
    try:
        entries = retry(lambda: fs.ls(path, detail=True, refresh=True), f"listing {url}")
    except FileNotFoundError:
        return {}
    protocol = url.split("://", 1)[0]
    for e in entries:  # a reader of one of these objects needs no request for its size
        if e.get("type") == "file" and e.get("size") is not None:
            _listed[f"{protocol}://{e['name'].lstrip('/')}"] = e
    return {posixpath.basename(e["name"].rstrip("/")): e for e in entries}


#: Listing details of the objects this process (or the one it forked from) listed, by URL: a shard's
#: reader opens it without a HEAD request (a DataLoader worker has a fresh fsspec instance, no cache).
_listed: dict[str, dict[str, Any]] = {}


def glob(pattern: str) -> list[str]:
    """The URLs a glob pattern matches, sorted."""
    fs, path = filesystem(pattern)
    protocol = pattern.split("://", 1)[0]
    found = retry(lambda: fs.glob(path), f"listing {pattern}")
    return sorted(f"{protocol}://{p.lstrip('/')}" for p in found)  # as the pattern spells the protocol


def modified(details: dict[str, Any]) -> float:
    """An object's modification time (seconds) from its listing details; 0 when the store gives none."""
    stamp = details.get("LastModified") or details.get("mtime") or details.get("updated") or 0
    return stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp or 0)


def download(url: str, dest: str | Path) -> Path:
    """``url`` (an object, or a folder of them) to local ``dest``, a file written atomically (a folder
    under a temporary name, then renamed; one already at ``dest``, as another rank downloads it, is kept)."""
    fs, path = filesystem(url)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if retry(lambda: fs.info(path), f"inspecting {url}")["type"] == "directory":
        tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            retry(lambda: fs.get(path.rstrip("/") + "/", str(tmp), recursive=True), f"downloading {url}")
            try:
                os.replace(tmp, dest)
            except OSError:  # another process (rank) downloaded it first: keep that one
                if not dest.is_dir():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest
    atomic_write(dest, lambda tmp: retry(lambda: fs.get_file(path, tmp), f"downloading {url}"))
    return dest


def local_copy(url: str | os.PathLike) -> str:
    """A local path for a checkpoint or export that may be in the store: a local path as it is; a
    URL downloaded into ``$MMPRETRAIN_CACHE`` (default ``~/.cache/mmpretrain``)/``store/`` (again
    only when the object changed: its listed size and time name the copy)."""
    url = str(url)
    if not is_remote(url):
        return url
    fs, path = filesystem(url)
    info = retry(lambda: fs.info(path), f"inspecting {url}")
    stamp = f"{url}\0{info.get('size')}\0{modified(info)}\0{info.get('ETag', '')}"
    root = Path(os.environ.get("MMPRETRAIN_CACHE", Path.home() / ".cache" / "mmpretrain")) / "store"
    dest = root / hashlib.sha1(stamp.encode()).hexdigest()[:16] / posixpath.basename(path.rstrip("/"))
    if not dest.exists():
        print(f"downloading {url} -> {dest}", flush=True)
        download(url, dest)
    return str(dest)


# -- writing ---------------------------------------------------------------------------------------
def _tmp_key(path: str) -> str:
    head, name = posixpath.split(path.rstrip("/"))
    return posixpath.join(head, f".{name}.tmp-{uuid.uuid4().hex[:8]}")


def put_file(local: str | Path, url: str) -> None:
    """Upload a local file to ``url`` atomically for readers (temporary key, copy, remove)."""
    fs, path = filesystem(url)
    tmp = _tmp_key(path)
    retry(lambda: fs.put_file(str(local), tmp), f"uploading {local} to {url}")
    retry(lambda: fs.copy(tmp, path), f"publishing {url}")
    _remove_quietly(fs, tmp)


def put_bytes(url: str, data: bytes) -> None:
    """``url`` holds ``data``, written atomically for readers (temporary key, copy, remove)."""
    fs, path = filesystem(url)
    tmp = _tmp_key(path)
    retry(lambda: fs.pipe_file(tmp, data), f"writing {url}")
    retry(lambda: fs.copy(tmp, path), f"publishing {url}")
    _remove_quietly(fs, tmp)


def put_dir(local: str | Path, url: str) -> None:
    """Upload a local directory (a sharded checkpoint) to ``url``: the marker of a complete one
    (:data:`COMPLETE`) is removed first and written last, after every file, each atomically."""
    fs, path = filesystem(url)
    marker = join(path, COMPLETE)
    _remove_quietly(fs, marker)
    local = Path(local)
    files = sorted(p for p in local.rglob("*") if p.is_file())
    names = {p.relative_to(local).as_posix() for p in files}
    for old in listing(url):  # files of an older checkpoint under this name that this one lacks
        if old not in names and old != COMPLETE and not old.startswith("."):
            _remove_quietly(fs, join(path, old), recursive=True)
    for p in files:
        put_file(p, f"{url.rstrip('/')}/{p.relative_to(local).as_posix()}")
    put_bytes(f"{url.rstrip('/')}/{COMPLETE}", b"")


def remove(url: str) -> None:
    """Remove an object or folder; nothing when it is not there."""
    fs, path = filesystem(url)
    try:
        retry(lambda: fs.rm(path, recursive=True), f"removing {url}")
    except FileNotFoundError:
        pass


def _remove_quietly(fs: Any, path: str, recursive: bool = False) -> None:
    try:
        retry(lambda: fs.rm(path, recursive=recursive), f"removing {path}")
    except (FileNotFoundError, StorageError):
        pass


# -- the background uploader -----------------------------------------------------------------------
class Uploader:
    """Uploads run files to ``remote`` (``s3://bucket/runs/NAME``) in a background thread, so that
    training steps never wait on the store unless :data:`queue_size` uploads are already pending.

    :meth:`upload` snapshots a file or directory (a copy, or a hard link for files replaced whole,
    under ``staging``) before queueing it: the run may replace or remove the original meanwhile. Later
    snapshots of one name supersede earlier ones still queued. :meth:`delete` removes a remote name in
    order with the uploads. :meth:`close` waits for everything queued and says so. A failed upload is
    logged and counted (``failed``), never raised into training."""

    def __init__(self, remote: str, staging: str | Path, queue_size: int = 8):
        self.remote = remote.rstrip("/")
        self.staging = Path(staging)
        shutil.rmtree(self.staging, ignore_errors=True)  # what a killed run left there
        self.staging.mkdir(parents=True, exist_ok=True)
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.latest: dict[str, str] = {}  # remote name -> id of its newest snapshot
        self.uploaded, self.failed, self.bytes, self.waited_s = 0, 0, 0, 0.0
        self._thread = threading.Thread(target=self._work, name="mmpretrain-uploader", daemon=True)
        self._thread.start()

    def url(self, name: str) -> str:
        return f"{self.remote}/{name}"

    def upload(self, local: str | Path, name: str, link: bool = False) -> None:
        """Queue ``local`` (a file or directory) for upload to ``<remote>/<name>``. ``link``: snapshot by
        hard link (files only ever replaced whole, as checkpoints are), else by copy (files appended to)."""
        local = Path(local)
        snap = self.staging / uuid.uuid4().hex[:12]
        copy = _link_or_copy if link else shutil.copy2
        if local.is_dir():
            shutil.copytree(local, snap, copy_function=copy)
        else:
            copy(str(local), str(snap))
        self.latest[name] = snap.name
        self._put(("upload", name, snap))

    def delete(self, name: str) -> None:
        self.latest.pop(name, None)
        self._put(("delete", name, None))

    def _put(self, item: tuple) -> None:
        start = time.perf_counter()
        self.queue.put(item)  # blocks only when queue_size uploads are pending
        self.waited_s += time.perf_counter() - start

    def _work(self) -> None:
        while True:
            item = self.queue.get()
            try:
                if item is None:
                    return
                self._do(*item)
            finally:
                self.queue.task_done()

    def _do(self, kind: str, name: str, snap: Path | None) -> None:
        try:
            if kind == "delete":
                remove(self.url(name))
                return
            if self.latest.get(name) != snap.name:
                return  # superseded by a newer snapshot of the same name, queued behind this one
            if snap.is_dir():
                put_dir(snap, self.url(name))
                self.bytes += sum(p.stat().st_size for p in snap.rglob("*") if p.is_file())
            else:
                put_file(snap, self.url(name))
                self.bytes += snap.stat().st_size
            self.uploaded += 1
        except Exception as exc:  # noqa: BLE001 (an upload that fails must not stop training: reported)
            self.failed += 1
            log.error("upload of %s to %s failed: %s: %s", name, self.url(name), type(exc).__name__, exc)
        finally:
            if snap is not None:
                shutil.rmtree(snap, ignore_errors=True) if snap.is_dir() else snap.unlink(missing_ok=True)

    def pending(self) -> int:
        return self.queue.unfinished_tasks

    def close(self) -> None:
        """Wait for every queued upload, then stop the thread; prints what it waited for."""
        n = self.pending()
        start = time.perf_counter()
        if n:
            print(f"waiting for {n} upload(s) to {self.remote} ...", flush=True)
        self.queue.put(None)
        self._thread.join()
        shutil.rmtree(self.staging, ignore_errors=True)
        print(
            f"uploads to {self.remote}: {self.uploaded} done ({self.bytes / 1e6:.1f} MB), "
            f"{self.failed} failed; "
            f"waited {time.perf_counter() - start:.1f} s at the end, {self.waited_s:.1f} s during the run "
            f"(queue full); {retries_so_far()} storage retries",
            flush=True,
        )


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def put_tree(local: str | Path, url: str, last: tuple[str, ...] = ("sizes.json",)) -> int:
    """Upload the files of a local folder to ``url`` (hidden ones left out), each atomically; those
    already there with the same size are kept, and files named in ``last`` go after all others (a
    reader that finds a ``sizes.json`` finds its shards). The number uploaded."""
    fs, path = filesystem(url)
    local = Path(local)
    try:
        there = retry(lambda: fs.find(path, detail=True), f"listing {url}")
    except FileNotFoundError:
        there = {}
    sizes = {posixpath.relpath(k, path): v.get("size") for k, v in there.items()}
    files = [
        p for p in sorted(local.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(local).parts)
    ]  # fmt: skip
    files.sort(key=lambda p: p.name in last)
    n = 0
    for p in files:
        rel = p.relative_to(local).as_posix()
        if sizes.get(rel) == p.stat().st_size and p.name not in last:
            continue
        put_file(p, f"{url.rstrip('/')}/{rel}")
        n += 1
    return n


def staging_dir(url: str) -> Path:
    """A local folder that stands for ``url`` while it is built (the same for every run, so an
    interrupted build resumes): ``$MMPRETRAIN_CACHE/staging/<hash of url>``."""
    root = Path(os.environ.get("MMPRETRAIN_CACHE", Path.home() / ".cache" / "mmpretrain"))
    return root / "staging" / hashlib.sha1(url.encode()).hexdigest()[:16]
