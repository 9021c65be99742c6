"""One writer per run directory: an exclusive ``flock`` on ``OUT_DIR/run.lock`` held by the run's
rank 0 for as long as it lives. The kernel releases the lock when that process exits, however it
exits, so a crashed run never blocks the next one, while a second live run on the same directory is
refused with the holder's host, pid, start time and command.

The lock file is removed when the run ends (the flock of a run killed with SIGKILL is released by the
kernel; its file stays and is reused). (``flock`` is reliable on local file systems; on NFS it depends on
the server's lock support.)
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from common.errors import UsageError

LOCK_FILE = "run.lock"


class RunDirectoryBusy(UsageError):
    """Another live run writes this directory."""


class RunLock:
    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / LOCK_FILE
        self.handle = None
        self.created_dir = False

    def acquire(self) -> None:
        folder = self.path.parent
        self.created_dir = not folder.exists()
        while True:
            handle = self._open(folder)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "(no details recorded)"
                handle.close()
                raise RunDirectoryBusy(
                    f"{folder} is in use by a live run: {holder}; stop that run, or use another --train.out_dir"
                ) from None
            # A run that released the lock meanwhile removed the file we opened: lock the file there now.
            try:
                if os.fstat(handle.fileno()).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            handle.close()
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                 "command": " ".join(sys.argv)}) + "\n")
        handle.flush()
        self.handle = handle

    def _open(self, folder: Path):
        """The lock file, the run directory made if needed; a directory that cannot be written is one line."""
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return open(self.path, "a+")
        except (FileExistsError, NotADirectoryError):
            raise UsageError(f"--train.out_dir {folder}: a file stands where the directory (or one of its parents) "
                             "would be; choose another --train.out_dir") from None
        except OSError as err:
            raise UsageError(f"--train.out_dir {folder} cannot be written ({err.strerror}); choose a directory "
                             "you can write") from None

    def release(self) -> None:
        """Remove the lock file, then release the lock (a failed start leaves nothing behind; a directory this
        run created and left empty is removed too)."""
        if self.handle is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()
        self.handle = None
        if self.created_dir:
            try:
                self.path.parent.rmdir()  # only if empty
            except OSError:
                pass
