"""One writer per workdir: a training run holds its workdir's lock from its start to its exit.

Two runs writing one workdir interleave metrics.jsonl, delete each other's
checkpoints (keep-N) and judge a step still being written damaged. So
`train_and_evaluate` takes the lock before it reads or writes the workdir, and
a second run is refused with a paragraph naming the holder. Readers (eval,
sample, probes, notebooks) take no lock: they never write into a run.

Local workdirs: an OS lock (`flock`) on WORKDIR/lock.json. The kernel drops it
when the process ends, however it ends (exit, SIGTERM, a crash, SIGKILL), so a
dead run never blocks the next one.

Buckets (gs://): the object WORKDIR/lock.json is created only if absent
(`ifGenerationMatch=0`: of two runs exactly one succeeds). Its holder rewrites
it every HEARTBEAT_S, each time only if it is still the generation it wrote;
a lock not rewritten for TAKEOVER_S (by the bucket's clock, `updated`) belongs
to a dead run and is taken over, again under a generation precondition.

Both record the holder: host, pid, start time (UTC).
"""
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from typing import Any

from absl import logging

from nda_jax import workdir as workdir_lib

_STORAGE_ERRORS = (errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM)
LOCK_FILE = "lock.json"
HEARTBEAT_S = 60
TAKEOVER_S = 600     # Ten missed heartbeats: the holder is dead, not slow.

_HELD: dict[str, Any] = {}   # str(workdir path) -> the lock this process holds on it.


class WorkdirInUseError(RuntimeError):
  """Another run holds the workdir's lock."""


def _record() -> dict[str, Any]:
  return {"host": socket.gethostname(), "pid": os.getpid(),
          "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "command": " ".join(sys.argv)}


def _in_use(workdir: str, lock_path: str, holder: dict[str, Any] | None) -> WorkdirInUseError:
  if holder:
    who = (f"host {holder.get('host')}, pid {holder.get('pid')}, started "
           f"{holder.get('started')} UTC ({holder.get('command', '')})")
  else:
    who = "a run that has not yet written its record"
  return WorkdirInUseError(
      f"--workdir={workdir} is in use by another run: {who}; its lock is {lock_path}. A "
      f"workdir has one writer: wait for that run to end (or stop it: SIGTERM saves and "
      f"exits), or train in another --workdir. Nothing was changed. `nda_jax.eval` and "
      f"`nda_jax.sample` may read the run meanwhile.")


def holds(workdir: str) -> bool:
  """True when this process holds `workdir`'s lock."""
  return str(workdir_lib.path(workdir)) in _HELD


def acquire(workdir: str) -> "_LocalLock | _BucketLock":
  """The workdir's lock, or WorkdirInUseError naming its holder (nothing changed)."""
  lock = _LocalLock(workdir) if workdir_lib.is_local(workdir) else _BucketLock(workdir)
  _HELD[str(workdir_lib.path(workdir))] = lock
  return lock


class _LocalLock:
  """flock on WORKDIR/lock.json; the file (and a workdir made for it) goes on release."""

  def __init__(self, workdir: str):
    self._key = str(workdir_lib.path(workdir))
    self._dir = self._key
    self._path = os.path.join(self._dir, LOCK_FILE)
    self._made_dir = not os.path.isdir(self._dir)
    try:
      os.makedirs(self._dir, exist_ok=True)
      while True:
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
          fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
          holder = _parse(os.pread(fd, 1 << 16, 0))
          os.close(fd)
          raise _in_use(workdir, self._path, holder) from None
        if _same_file(fd, self._path):
          break
        os.close(fd)   # Its holder released and unlinked it meanwhile: lock the new file.
    except OSError as e:
      if e.errno in _STORAGE_ERRORS:
        raise   # The CLIs' storage-error paragraph names the file.
      raise ValueError(f"--workdir={workdir}: cannot create its lock file {self._path} "
                       f"({e.strerror}); a run needs a workdir it can write") from None
    self._fd = fd
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(_record()).encode(), 0)
    os.fsync(fd)

  def release(self) -> None:
    if self._fd is None:
      return
    _HELD.pop(self._key, None)
    try:
      os.unlink(self._path)   # Under the lock: a waiter that opened it re-checks (_same_file).
    except FileNotFoundError:
      pass
    os.close(self._fd)
    self._fd = None
    if self._made_dir:
      try:
        os.rmdir(self._dir)   # Only if the run left nothing (a config error on a new workdir).
      except OSError:
        pass


def _same_file(fd: int, path: str) -> bool:
  try:
    return os.fstat(fd).st_ino == os.stat(path).st_ino
  except FileNotFoundError:
    return False


def _parse(data: bytes) -> dict[str, Any] | None:
  try:
    record = json.loads(data)
  except ValueError:
    return None
  return record if isinstance(record, dict) else None


class _BucketLock:
  """WORKDIR/lock.json in a bucket, written under generation preconditions, with a heartbeat."""

  def __init__(self, workdir: str, heartbeat_s: float = HEARTBEAT_S,
               takeover_s: float = TAKEOVER_S):
    try:
      from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
      from google.cloud import storage  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ValueError(f"--workdir={workdir}: a bucket workdir needs the `gcs` extra "
                       f"(pip install -e \".[gcs]\")") from None
    self._conflict = exceptions.PreconditionFailed
    self._not_found = exceptions.NotFound
    self._key = str(workdir_lib.path(workdir))
    bucket, _, prefix = self._key.split("://", 1)[1].partition("/")
    name = f"{prefix.rstrip('/')}/{LOCK_FILE}" if prefix.strip("/") else LOCK_FILE
    self.uri = f"gs://{bucket}/{name}"
    self._blob = storage.Client().bucket(bucket).blob(name)
    self._record = _record()
    self._generation = self._take(workdir, takeover_s)
    self._stop = threading.Event()
    self.lost = False
    self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True,
                                    name="nda_jax_workdir_lock")
    self._thread.start()

  def _write(self, if_generation_match: int) -> int:
    self._record["heartbeat"] = time.time()
    self._blob.upload_from_string(json.dumps(self._record), content_type="application/json",
                                  if_generation_match=if_generation_match)
    return self._blob.generation

  def _take(self, workdir: str, takeover_s: float) -> int:
    try:
      return self._write(if_generation_match=0)
    except self._conflict:
      pass
    try:
      self._blob.reload()
      holder = _parse(self._blob.download_as_bytes(if_generation_match=self._blob.generation))
    except (self._conflict, self._not_found):   # Released or rewritten meanwhile.
      raise _in_use(workdir, self.uri, None) from None
    silent_s = time.time() - self._blob.updated.timestamp()
    if silent_s < takeover_s:
      raise _in_use(workdir, self.uri, holder)
    try:
      generation = self._write(if_generation_match=self._blob.generation)
    except self._conflict:   # Another run took it over first.
      raise _in_use(workdir, self.uri, None) from None
    logging.warning("took over the lock %s of a run silent for %.0f s (%s)", self.uri,
                    silent_s, holder)
    return generation

  def _beat(self, heartbeat_s: float) -> None:
    while not self._stop.wait(heartbeat_s):
      try:
        self._generation = self._write(if_generation_match=self._generation)
      except self._conflict:
        self.lost = True
        logging.error("lost the workdir lock %s: another run took it over (this run missed "
                      "heartbeats for over %d s); stop this run", self.uri, TAKEOVER_S)
        return
      except Exception as e:  # pylint: disable=broad-except  (a network hiccup: try next beat)
        logging.warning("workdir lock heartbeat failed (%s); retrying", e)

  def release(self) -> None:
    if self._stop.is_set():
      return
    _HELD.pop(self._key, None)
    self._stop.set()
    self._thread.join()
    if self.lost:
      return
    try:
      self._blob.delete(if_generation_match=self._generation)
    except (self._conflict, self._not_found):
      pass
