"""Shards under a remote root (any fsspec URL: s3://, gs://, memory://), fetched per rank into a node-local cache.

Opening a remote split fetches only its indexes (small). Before an epoch starts, each rank fetches the tars that the
dealing rule gives it for that epoch (``ShardCache.fetch``): several at a time, each checked against the bytes its
index needs, retried with backoff on transient errors; the next epoch's are fetched in the background during the
current one (``prefetch``), so once the first epoch is in, no epoch start waits on the network.

The cache folder (``data.cache_dir``) is shared by the ranks of a node. Every file has a lock file beside it
(``flock``; released by the kernel when a process dies): a rank that needs a file locks it exclusively, downloads it
to a temporary name of its own (``<file>.partial-<pid>-<thread>``) and renames it into place, so a file under its
final name is always complete and a crash leaves only a temporary file, removed by the next download of it. While
a rank uses a file (this epoch or the next) it holds a shared lock on it. With ``data.cache_limit`` a download first
evicts the least recently used files that no process holds.

Hand-written because fsspec's caching filesystems (``filecache``, ``blockcache``) lock nothing between processes
and have no size bound that respects files in use.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import hashlib
import os
import posixpath
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple

import fsspec

from conv2former.errors import DataFault, UserError
from conv2former.retry import retried
from conv2former.units import human

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "conv2former", "shards")
LOCK_SUFFIX = ".lock"
PARTIAL = ".partial-"
RESERVE = ".reserve"
ROOM_WAIT_S = 120.0  # how long a fetch waits for room under data.cache_limit before it stops the run


def is_remote(url: str) -> bool:
    fs, _ = fsspec.core.url_to_fs(url)
    return not isinstance(fs, fsspec.implementations.local.LocalFileSystem)


def remote_problem(url: str, err: BaseException) -> str:
    """One line for a remote error: a missing object, missing credentials, access denied, anything else."""
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    name = type(err).__name__
    text = str(err).splitlines()[0] if str(err) else name
    if isinstance(err, FileNotFoundError):
        return f"{url} does not exist ({protocol})"
    if "credential" in (name + text).lower():
        return (
            f"no credentials for {url} ({protocol}: {name}): configure them (for s3: AWS_ACCESS_KEY_ID/... or ~/.aws)"
        )
    if isinstance(err, PermissionError) or "denied" in text.lower() or "forbidden" in text.lower():
        return f"access denied to {url} ({protocol}: {text}): check the bucket policy and the credentials"
    return f"cannot read {url} ({protocol}: {name}: {text})"


@dataclass
class FetchStats:
    files: int = 0  # downloaded by this process
    bytes: int = 0
    hits: int = 0  # already in the cache (another rank of the node, an earlier epoch or run)
    seconds: float = 0.0  # spent downloading (summed over files)
    waited: float = 0.0  # epoch starts spent waiting for a fetch
    evicted: int = 0

    def as_dict(self) -> Dict[str, float]:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in self.__dict__.items()}


@dataclass
class Wanted:
    """One file to have locally: its URL, cache path, and the bytes it must hold at least (its index's end)."""

    url: str
    local: str
    need: int = 0
    size: int = 0  # the remote file's size when known (what it will take in the cache)
    check: Optional[Callable[[str], None]] = field(default=None, compare=False)  # raises UserError if wrong


class NoRoom(Exception):
    """A background fetch that would need evicting files in use: left to the foreground fetch of that epoch."""


class ShardCache:
    """The node-local cache of one process (see the module docstring). Thread-safe."""

    def __init__(self, cache_dir: Optional[str], limit: Optional[int] = None, workers: int = 8, retries: int = 4,
                 backoff: float = 0.5) -> None:  # fmt: skip
        self.dir = os.path.expanduser(cache_dir or DEFAULT_CACHE)
        self.limit, self.retries, self.backoff = limit, retries, backoff
        self.stats = FetchStats()
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="c2f-fetch")
        self._held: Dict[str, int] = {}  # local path -> fd of its lock file, held shared
        self._pinned: Set[str] = set()  # held for the whole run (the indexes)
        self._inflight: Dict[str, "Future[None]"] = {}
        self._mutex = threading.Lock()
        self._evict_mutex = threading.Lock()
        try:
            os.makedirs(self.dir, exist_ok=True)
        except OSError as err:
            raise UserError(f"data.cache_dir {self.dir} cannot be created ({err.strerror}): set another") from None

    def local_path(self, url: str) -> str:
        return os.path.join(self.dir, hashlib.sha1(url.encode()).hexdigest()[:16] + "-" + posixpath.basename(url))

    # -- fetching ---------------------------------------------------------------------------------------------------
    def fetch(self, wanted: Iterable[Wanted], progress: Optional[Callable[[int], None]] = None,
              pin: bool = False) -> Dict[str, str]:  # fmt: skip
        """Have every wanted file locally, held (``pin``: for the whole run); returns {url: problem} for those that
        could not be fetched."""
        start = time.perf_counter()
        wanted = list(wanted)
        if pin:
            self._pinned.update(w.local for w in wanted)
        futures = [(w, self._submit(w)) for w in wanted]
        failed = {}
        for w, future in futures:
            try:
                try:
                    future.result()
                except NoRoom:  # a background fetch of it gave up for room: now it must make room
                    self._submit(w).result()
            except (DataFault, UserError):
                raise
            except Exception as err:  # noqa: BLE001 - reported per shard, the loader decides
                failed[w.url] = str(err)
            if progress is not None:
                progress(1)
        self.stats.waited += time.perf_counter() - start
        return failed

    def prefetch(self, wanted: Iterable[Wanted]) -> None:
        """Start fetching in the background; a file that does not fit the limit now, or fails, is left to the
        foreground ``fetch`` of its epoch (which tries again and reports)."""
        for w in wanted:
            self._submit(w, background=True)

    def _submit(self, w: Wanted, background: bool = False) -> "Future[None]":
        with self._mutex:
            future = self._inflight.get(w.local)
            if future is not None and not (future.done() and future.exception() is not None and not background):
                return future
            future = self._pool.submit(self._have, w, background)
            self._inflight[w.local] = future
            return future

    def _have(self, w: Wanted, background: bool = False) -> None:
        """Hold ``w.local`` shared, downloading it first (exclusively) unless it is complete. A complete file needs
        only the shared lock, so ranks using a file never block one another; only a download is exclusive."""
        if w.local in self._held and os.path.exists(w.local):
            self.stats.hits += 1
            return
        fd = os.open(w.local + LOCK_SUFFIX, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            while True:
                fcntl.flock(fd, fcntl.LOCK_SH)  # waits while another rank downloads it
                if self._complete(w):
                    self.stats.hits += 1
                    os.utime(w.local)  # most recently used
                    break
                fcntl.flock(fd, fcntl.LOCK_UN)
                if not self._lock_to_download(fd, w):  # another rank completed it meanwhile: now held shared
                    self.stats.hits += 1
                    break
                if not self._complete(w):
                    self._download(w, background)
                fcntl.flock(fd, fcntl.LOCK_UN)  # then shared, as a user (an evictor may slip in between: again)
                fcntl.flock(fd, fcntl.LOCK_SH)
                if self._complete(w):
                    break
                fcntl.flock(fd, fcntl.LOCK_UN)
        except BaseException:
            os.close(fd)
            raise
        with self._mutex:
            old = self._held.pop(w.local, None)
            self._held[w.local] = fd
        if old is not None:
            os.close(old)

    def _lock_to_download(self, fd: int, w: Wanted) -> bool:
        """Lock ``w``'s file exclusively to download it (True), or hold it shared once another process completed it
        (False). Never a blocking exclusive wait: a rank that downloaded a file goes on holding it shared for its
        epoch, and the kernel may hand it that shared lock before a waiting exclusive one, which would then wait for
        the whole epoch while the holder waits for it at the next collective."""
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                pass
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # being downloaded: look again in a moment
                time.sleep(0.01)
                continue
            if self._complete(w):
                return False
            fcntl.flock(fd, fcntl.LOCK_UN)
            time.sleep(0.01)

    @staticmethod
    def _complete(w: Wanted) -> bool:
        try:
            return os.path.getsize(w.local) >= w.need
        except FileNotFoundError:
            return False

    def _download(self, w: Wanted, background: bool) -> None:
        for stale in glob.glob(glob.escape(w.local) + PARTIAL + "*"):  # a crashed download's (we hold the lock)
            os.remove(stale)
        tmp = f"{w.local}{PARTIAL}{os.getpid()}-{threading.get_ident()}"
        deadline = time.monotonic() + ROOM_WAIT_S
        while True:  # the foreground waits a while for other ranks' downloads and epochs to free room
            try:
                reserved = self._make_room(max(w.size, w.need), tmp + RESERVE, background)
                break
            except DataFault:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        try:
            self._download_to(w, tmp)
        finally:
            if reserved and os.path.exists(reserved):
                os.remove(reserved)

    def _download_to(self, w: Wanted, tmp: str) -> None:
        """``w`` fetched into the cache through ``tmp``, retried with backoff (conv2former/retry.py) on errors that
        may pass; a missing or refused object, bad credentials or a full disk end at once."""
        try:
            retried(lambda: self._fetch_once(w, tmp), self.retries, self.backoff, _worth_retrying)
        except (UserError, DataFault):
            raise
        except Exception as err:  # noqa: BLE001 - botocore and friends: one line naming the object
            if not _worth_retrying(err):
                raise OSError(remote_problem(w.url, err)) from None
            raise OSError(
                f"could not be fetched after {self.retries + 1} tries ({remote_problem(w.url, err)})"
            ) from None

    def _fetch_once(self, w: Wanted, tmp: str) -> None:
        fs, path = fsspec.core.url_to_fs(w.url)
        start = time.perf_counter()
        try:
            fs.get_file(path, tmp)
            size = os.path.getsize(tmp)
            if size < w.need:
                raise OSError(f"downloaded {size} bytes, its index needs {w.need}")
            if w.check is not None:
                w.check(tmp)
            os.replace(tmp, w.local)
            self.stats.files += 1
            self.stats.bytes += size
            self.stats.seconds += time.perf_counter() - start
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise DataFault(
                    f"the shard cache disk is full: {self.dir} ({human(_free(self.dir))} free) while fetching "
                    f"{w.url}: set data.cache_limit below the disk's size or data.cache_dir on a larger disk"
                ) from None
            raise
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    # -- the bound --------------------------------------------------------------------------------------------------
    def _make_room(self, size: int, reserve: str, background: bool = False) -> Optional[str]:
        """Evict the least recently used files nobody holds until ``size`` more bytes fit under the limit, and reserve
        them (a sparse file of that size, ``reserve``, counted until the download is in place). Decided under a lock
        of the whole cache, so the node's ranks never overcommit it together."""
        if self.limit is None:
            return None
        with self._evict_mutex, _locked(os.path.join(self.dir, ".evict" + LOCK_SUFFIX)):
            files = self._cached_files()
            total = sum(s for _, s, _ in files) + self._reserved_bytes()
            for path, s, _ in sorted(files, key=lambda f: f[2]):
                if total + size <= self.limit:
                    break
                if path in self._held or not self._try_evict(path):
                    continue
                total -= s
                self.stats.evicted += 1
            if total + size <= self.limit:
                with open(reserve, "wb") as f:
                    f.truncate(size)
                return reserve
            if background:
                raise NoRoom(reserve)
            raise DataFault(
                f"data.cache_limit {human(self.limit)} is full: the ranks of this node hold {human(total)} of "
                f"shards in use and {human(size)} more are needed: raise data.cache_limit"
            )

    def _reserved_bytes(self) -> int:
        """The bytes reserved by downloads in flight on this node (a dead process's reservation is dropped)."""
        total = 0
        for path in glob.glob(os.path.join(glob.escape(self.dir), "*" + PARTIAL + "*" + RESERVE)):
            pid = path.rsplit(PARTIAL, 1)[1].split("-", 1)[0]
            try:
                if pid.isdigit() and not _alive(int(pid)):
                    os.remove(path)
                    continue
                total += os.path.getsize(path)
            except FileNotFoundError:
                pass
        return total

    def _cached_files(self) -> List[Tuple[str, int, float]]:
        out = []
        for entry in os.scandir(self.dir):
            if entry.name.endswith(LOCK_SUFFIX) or PARTIAL in entry.name or not entry.is_file():
                continue
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            out.append((entry.path, st.st_size, st.st_mtime))
        return out

    @staticmethod
    def _try_evict(path: str) -> bool:
        fd = os.open(path + LOCK_SUFFIX, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        try:
            os.remove(path)
            return True
        except FileNotFoundError:
            return False
        finally:
            os.close(fd)

    def release(self, keep: Iterable[str]) -> None:
        """Stop holding every file but ``keep`` (local paths): they may be evicted now."""
        keep = set(keep)
        with self._mutex:
            for path in [p for p in self._held if p not in keep and p not in self._pinned]:
                os.close(self._held.pop(path))
                self._inflight.pop(path, None)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pinned.clear()
        self.release(())


class _locked:
    """An exclusive flock on ``path`` for a ``with`` block."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _free(folder: str) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def _worth_retrying(err: BaseException) -> bool:
    """A fetch error that may pass (a dropped connection, a throttled request, a short read), not a missing or
    refused object, bad credentials, a full disk or a user's mistake."""
    if isinstance(err, (UserError, DataFault, FileNotFoundError, PermissionError)):
        return False
    return "credential" not in type(err).__name__.lower()
