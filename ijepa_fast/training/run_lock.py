"""One writer per run folder: ``<run>/.lock`` holds the pid and host of the process training there.

Taken (created exclusively) when a training starts and removed when it ends. A second training of
the same folder is refused with an error naming the holder; a lock left by a process that no longer
runs on this host (killed, crashed) is taken over with a warning.
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import time
from pathlib import Path

from ..errors import RunFolderBusy
from ..runlog.output import log

LOCK = ".lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


def _read(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text())
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


class RunLock:
    """The lock of ``run_dir``; ``acquire()`` takes it, ``release()`` (also run at exit) gives it back."""

    def __init__(self, run_dir):
        self.path = Path(run_dir) / LOCK
        self.held = False

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read(self.path)
                if not self._stale(holder):
                    raise RunFolderBusy(
                        f"the run folder {self.path.parent} is in use by process {holder.get('pid', '?')} on "
                        f"{holder.get('host', '?')} (since {holder.get('since', '?')}): wait for it to finish, stop "
                        f"it, or train in another --run-dir (if that process is gone, delete {self.path})") from None
                log.warning(f"taking over the lock of {self.path.parent}: its holder, process {holder.get('pid', '?')}"
                            f" on {holder.get('host', '?')}, no longer runs")
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me) + "\n")
            self.held = True
            atexit.register(self.release)
            return
        raise RunFolderBusy(f"the run folder {self.path.parent} was locked by another process while starting: "
                            f"train in another --run-dir")

    @staticmethod
    def _stale(holder: dict) -> bool:
        """A lock whose holder is gone: a dead pid on this host, or a file that is not a lock at all."""
        pid = holder.get("pid")
        if not isinstance(pid, int):
            return True
        if holder.get("host") != socket.gethostname():
            return False  # another machine's process: it cannot be checked from here
        return pid != os.getpid() and not _alive(pid)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            if _read(self.path).get("pid") == os.getpid():
                self.path.unlink()
        except OSError:
            pass
