"""One writer per run directory: an exclusive ``flock`` on ``OUT_DIR/run.lock`` held by the run's
rank 0 for as long as it lives. The kernel releases the lock when that process exits, however it
exits, so a crashed run never blocks the next one, while a second live run on the same directory is
refused with the holder's host, pid, start time and command.

(``flock`` is reliable on local file systems; on NFS it depends on the server's lock support.)
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

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "(no details recorded)"
            handle.close()
            raise RunDirectoryBusy(
                f"{self.path.parent} is in use by a live run: {holder}; stop that run, or use another "
                "--train.out_dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                 "command": " ".join(sys.argv)}) + "\n")
        handle.flush()
        self.handle = handle

    def release(self) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None
