"""Where a run writes: a local folder, or any fsspec URL (s3://, gs://) through a node-local staging folder.

A local ``--output`` is written directly. A remote one is mirrored: every rank writes into the staging folder of its
node (``checkpoint.staging_dir``), and ``RunOutput`` uploads what is finished:

- a checkpoint tag, once every rank has saved its part: the first local rank of each node uploads the files its
  node's ranks wrote, all nodes meet in a barrier, then rank 0 uploads ``complete`` and ``latest`` (so a remote tag
  without ``complete`` is never taken as complete) and keeps the newest ``keep_last`` complete tags remotely;
- the rest (log.jsonl, tb/, export/, summary.json), by rank 0 with each checkpoint (before its marker: a complete
  remote tag has the log up to it), after an export and at the end, each file when its size or time changed since
  it was last uploaded.

On start (``restore``) the remote is the truth: each node takes the newest remote complete tag into its staging
folder if it lacks it, drops local tags the remote does not have complete, and rank 0 takes the other files it
lacks, so a relaunch on a fresh node resumes exactly where the remote run stopped.

Hand-written because neither DeepSpeed (its checkpoint engines write POSIX paths) nor fsspec (no notion of a
checkpoint being complete across ranks) mirrors a run to an object store.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import posixpath
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Tuple

import fsspec

from conv2former.data.remote import is_remote, remote_problem
from conv2former.engine.checkpoint_layout import CHECKPOINTS, COMPLETE, LATEST, TAG
from conv2former.engine.distributed import first_failure
from conv2former.errors import EXIT_USER_ERROR, CheckpointFault, UserError
from conv2former.retry import attempt, retried

DEFAULT_STAGING = os.path.join(os.path.expanduser("~"), ".cache", "conv2former", "staging")
RETRIES, BACKOFF_S = 4, 0.5


def _retry(action: Callable[[], None]) -> None:
    retried(action, RETRIES, BACKOFF_S)


class RunOutput:
    """``local``: the folder this rank writes to (the output itself, or its node's staging folder)."""

    def __init__(self, url: str, staging_dir: Optional[str], rank: int, local_rank: int, workers: int = 8) -> None:
        self.url, self.rank, self.local_rank = url, rank, local_rank
        self.remote = is_remote(url)
        self.uploaded: Dict[str, Tuple[int, int]] = {}  # relative path -> (size, mtime_ns) when last uploaded
        self.stats = {"files": 0, "bytes": 0, "seconds": 0.0, "downloaded_bytes": 0}
        self.workers = workers
        self._pending_warning: Optional[str] = None
        if not self.remote:
            self.local = url
            self._makedirs(url, "output")
            return
        self.fs, self.root = fsspec.core.url_to_fs(url)
        key = hashlib.sha1(url.rstrip("/").encode()).hexdigest()[:16]
        self.local = os.path.join(os.path.expanduser(staging_dir or DEFAULT_STAGING), key)
        self._makedirs(self.local, "checkpoint.staging_dir")

    @staticmethod
    def _makedirs(path: str, what: str) -> None:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as err:
            raise UserError(f"{what} {path} cannot be created ({err.strerror}): choose another folder") from None

    def _remote(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    # -- start ------------------------------------------------------------------------------------------------------
    def restore(self) -> None:
        """Make the staging folder agree with the remote run (see the module docstring); a no-op for a local
        output. Every rank calls it; one line (UserError) when the remote cannot be read."""
        if not self.remote:
            return
        error = None
        if self.local_rank == 0:
            try:
                if self.rank == 0:
                    self._probe_write()
                self._restore_checkpoint()
                if self.rank == 0:
                    self._restore_files()
            except UserError as err:
                error = str(err)
            except OSError as err:
                error = remote_problem(self.url, err)
        failed = first_failure(error)
        if failed and self.rank == 0:
            raise UserError(failed[1])
        if failed:
            raise SystemExit(EXIT_USER_ERROR)  # rank 0 prints the line

    def _probe_write(self) -> None:
        """Write (and remove) one small object, so that a missing bucket or a read-only credential stops the run
        now rather than at its first checkpoint."""
        probe = self._remote(f".write-probe-{os.getpid()}")
        try:
            self.fs.pipe_file(probe, b"")
            self.fs.rm_file(probe)
        except OSError as err:
            raise UserError(
                f"--output {self.url} is not writable ({remote_problem(self.url, err)}): create the bucket, fix the "
                "credentials, or give another --output"
            ) from None

    def remote_complete_tags(self) -> List[str]:
        folder = self._remote(CHECKPOINTS)
        try:
            names = [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(folder, detail=False, refresh=True)]
        except FileNotFoundError:
            return []
        tags = sorted(n for n in names if TAG.fullmatch(n))
        return [t for t in tags if self.fs.exists(self._remote(CHECKPOINTS, t, COMPLETE))]

    def _restore_checkpoint(self) -> None:
        complete = self.remote_complete_tags()
        local_dir = os.path.join(self.local, CHECKPOINTS)
        os.makedirs(local_dir, exist_ok=True)
        for name in os.listdir(local_dir):  # the remote is the truth: nothing newer, nothing it lacks as complete
            if TAG.fullmatch(name) and name not in complete[-1:]:
                shutil.rmtree(os.path.join(local_dir, name), ignore_errors=True)
        if not complete:
            return
        tag = complete[-1]
        if not os.path.exists(os.path.join(local_dir, tag, COMPLETE)):
            partial = os.path.join(local_dir, f".{tag}.download-{os.getpid()}")
            shutil.rmtree(partial, ignore_errors=True)
            self._download_tree(self._remote(CHECKPOINTS, tag), partial)
            shutil.rmtree(os.path.join(local_dir, tag), ignore_errors=True)
            os.replace(partial, os.path.join(local_dir, tag))
        with open(os.path.join(local_dir, LATEST), "w") as f:
            f.write(tag)

    def _restore_files(self) -> None:
        """Rank 0: the files outside checkpoints/ that the staging folder lacks (log.jsonl continues, tb/ keeps its
        history, export/best/ is known), recorded as uploaded."""
        if not self.fs.exists(self.root):
            return
        for remote_path in self.fs.find(self.root):
            rel = posixpath.relpath(remote_path, self.root)
            if rel.split("/", 1)[0] == CHECKPOINTS:
                continue
            local_path = os.path.join(self.local, *rel.split("/"))
            if not os.path.exists(local_path):
                os.makedirs(os.path.dirname(local_path), exist_ok=True)
                _retry(functools.partial(self.fs.get_file, remote_path, local_path))
                self.stats["downloaded_bytes"] += os.path.getsize(local_path)
            st = os.stat(local_path)
            self.uploaded[rel] = (st.st_size, st.st_mtime_ns)

    def _download_tree(self, remote_dir: str, local_dir: str) -> None:
        files = [p for p in self.fs.find(remote_dir)]
        jobs = []
        for remote_path in files:
            local_path = os.path.join(local_dir, *posixpath.relpath(remote_path, remote_dir).split("/"))
            os.makedirs(os.path.dirname(local_path), exist_ok=True)
            jobs.append((remote_path, local_path))
        with ThreadPoolExecutor(self.workers) as pool:
            list(pool.map(lambda job: _retry(lambda: self.fs.get_file(*job)), jobs))
        self.stats["downloaded_bytes"] += sum(os.path.getsize(p) for _, p in jobs)

    # -- checkpoints ------------------------------------------------------------------------------------------------
    def push_checkpoint(self, tag: str, keep_last: int) -> Optional[str]:
        """Every rank, after the tag is complete locally: upload it and (rank 0) the run's other files, then mark it
        complete remotely and keep ``keep_last``. A failed tag upload raises CheckpointFault on every rank (the line
        on rank 0); a failed upload of the other files returns a warning line (retried at the next checkpoint)."""
        self._pending_warning = None
        if not self.remote:
            return None
        local_dir = os.path.join(self.local, CHECKPOINTS)
        error = None
        if self.local_rank == 0:
            error = self._attempt(lambda: self._upload_tag(local_dir, tag))
        failed = first_failure(error)
        if failed is None and self.rank == 0:
            self._pending_warning = self.push_files()  # the log up to this checkpoint is there once it is complete
            error = self._attempt(lambda: self._mark_remote(local_dir, tag, keep_last))
        failed = failed or first_failure(error if self.rank == 0 else None)
        if failed is not None:
            raise CheckpointFault(
                f"uploading checkpoint {tag} to {self.url} failed on rank {failed[0]} ({failed[1]}); the newest "
                "complete remote checkpoint "
                f"is {(self.remote_complete_tags() or ['none'])[-1]}: check the bucket and relaunch to resume from it"
                if self.rank == 0
                else ""
            )
        if self.local_rank == 0:  # the staging folder keeps what the remote keeps
            tags = sorted(t for t in os.listdir(local_dir) if TAG.fullmatch(t))
            for old in tags[:-keep_last]:
                shutil.rmtree(os.path.join(local_dir, old), ignore_errors=True)
        return self._pending_warning

    def _attempt(self, action: Callable[[], None]) -> Optional[str]:
        return attempt(action, (OSError,), lambda err: remote_problem(self.url, err))

    def _upload_tag(self, local_dir: str, tag: str) -> None:
        """The tag's files in this node's staging folder but its marker (rank 0 uploads that last)."""
        tag_dir = os.path.join(local_dir, tag)
        jobs = []
        for folder, _, names in os.walk(tag_dir):
            for name in names:
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, tag_dir).replace(os.sep, "/")
                if rel != COMPLETE:
                    jobs.append((path, self._remote(CHECKPOINTS, tag, rel)))
        self._put(jobs)

    def _mark_remote(self, local_dir: str, tag: str, keep_last: int) -> None:
        self._put([(os.path.join(local_dir, tag, COMPLETE), self._remote(CHECKPOINTS, tag, COMPLETE))])
        self._put([(os.path.join(local_dir, LATEST), self._remote(CHECKPOINTS, LATEST))])
        complete = self.remote_complete_tags()
        folder = self._remote(CHECKPOINTS)
        names = [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(folder, detail=False, refresh=True)]
        keep = set(complete[-keep_last:])
        for old in sorted(n for n in names if TAG.fullmatch(n) and n < complete[-1] and n not in keep):
            self.fs.rm(self._remote(CHECKPOINTS, old), recursive=True)

    def _put(self, jobs: List[Tuple[str, str]]) -> None:
        start = time.perf_counter()
        with ThreadPoolExecutor(self.workers) as pool:
            list(pool.map(lambda job: _retry(lambda: self.fs.put_file(*job)), jobs))
        self.stats["files"] += len(jobs)
        self.stats["bytes"] += sum(os.path.getsize(path) for path, _ in jobs)
        self.stats["seconds"] = round(self.stats["seconds"] + time.perf_counter() - start, 3)

    # -- the other files --------------------------------------------------------------------------------------------
    def push_files(self) -> Optional[str]:
        """Rank 0: upload the files outside checkpoints/ that changed since they were last uploaded. Returns a
        warning line when that failed (the next push tries again; training goes on)."""
        if not self.remote or self.rank != 0:
            return None
        jobs, marks = [], {}
        for folder, dirs, names in os.walk(self.local):
            if folder == self.local:
                dirs[:] = [d for d in dirs if d != CHECKPOINTS]
            for name in names:
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, self.local).replace(os.sep, "/")
                st = os.stat(path)
                if self.uploaded.get(rel) != (st.st_size, st.st_mtime_ns):
                    jobs.append((path, self._remote(*rel.split("/"))))
                    marks[rel] = (st.st_size, st.st_mtime_ns)
        error = self._attempt(lambda: self._put(jobs))
        if error is not None:
            return f"warning: uploading the run's files to {self.url} failed ({error}): retried at the next checkpoint"
        self.uploaded.update(marks)
        return None

    def write_summary(self, summary: Dict[str, Any]) -> None:
        """Rank 0: ``summary.json`` in the run folder (uploaded by the next push_files)."""
        if self.rank == 0:
            with open(os.path.join(self.local, "summary.json"), "w") as f:
                json.dump(summary, f, indent=1)
                f.write("\n")

    def shown(self, path: Optional[str]) -> Optional[str]:
        """``path`` (in the staging folder) as the user's output names it."""
        if not self.remote or path is None:
            return path
        rel = os.path.relpath(path, self.local).replace(os.sep, "/")
        return self.url.rstrip("/") + ("" if rel == "." else "/" + rel)

    def summary(self) -> Dict[str, Any]:
        """Its field of the run summary: with a remote output, what was uploaded (``describe``)."""
        return {"upload": self.describe()} if self.remote else {}

    def describe(self) -> Dict[str, object]:
        return {"url": self.url, "staging": self.local if self.remote else None, "uploaded": dict(self.stats)}
