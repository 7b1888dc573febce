"""One training process per workdir: an exclusive lock on ``train.lock``.

The lock is an ``fcntl.flock`` on ``WORKDIR/train.lock``, which names its
holder (pid, host, start time). The kernel drops it when the holder exits,
however it exits, so a lock file left by a killed process is stale and the
next run takes it over. The holder removes the file when it finishes.

Only local and NFS folders can be locked; a ``gs://``-style workdir is not.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time

LOCK_NAME = "train.lock"


class WorkdirLockedError(RuntimeError):
  """Another live process trains in the same workdir."""


def _holder(path: str) -> str:
  try:
    with open(path, encoding="utf-8") as f:
      info = json.load(f)
    return (f"pid {info['pid']} on {info['host']}, started "
            f"{info['started']}")
  except (OSError, ValueError, KeyError, TypeError):
    return "a process that has not written its name yet"


class WorkdirLock:
  """Holds ``workdir/train.lock`` from :meth:`acquire` to :meth:`release`."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_NAME)
    self._fd = None

  def acquire(self) -> "WorkdirLock":
    """Takes the lock or raises WorkdirLockedError naming its holder."""
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        os.close(fd)
        raise WorkdirLockedError(
            f"Another train.py ({_holder(self.path)}) is training in "
            f"{os.path.dirname(self.path)}: wait for it to finish or stop "
            "it, or use another --workdir.") from None
      # A holder that was releasing may have removed the file we locked;
      # then the lock is on a dead inode: try again on the new file.
      try:
        if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
          break
      except FileNotFoundError:
        pass
      os.close(fd)
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.write(fd, (json.dumps(info) + "\n").encode())
    self._fd = fd
    return self

  def release(self) -> None:
    """Removes the lock file, then drops the lock (removing it first keeps
    a waiting process from locking a file that is about to vanish)."""
    if self._fd is None:
      return
    try:
      os.unlink(self.path)
    except FileNotFoundError:
      pass
    os.close(self._fd)
    self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
