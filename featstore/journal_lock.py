"""The lock of an Optuna journal file that knows its holder.

Optuna's JournalFileSymlinkLock is a symlink created for the few milliseconds of a journal write; a
process killed inside that window leaves it behind, and the next process waits its 30 s grace period
(warning three times) before taking it. Here the link's target names the holder (pid and host), so a
lock whose holder is a dead process on this machine is taken at once; a live or unknown holder gets
Optuna's own wait.
"""
from __future__ import annotations

import errno
import os
import socket
import time

from optuna.storages.journal import JournalFileSymlinkLock


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class HolderSymlinkLock(JournalFileSymlinkLock):
    SEP = "#featstore-holder="

    def __init__(self, filepath: str, grace_period: int | None = 30):
        super().__init__(filepath, grace_period)
        self._path = filepath

    def holder(self) -> tuple[int, str] | None:
        """(pid, host) of the lock's holder, None when there is no lock or it does not say."""
        try:
            target = os.readlink(self._lock_file)
        except OSError:
            return None
        _, sep, who = target.rpartition(self.SEP)
        pid, at, host = who.partition("@")
        return (int(pid), host) if sep and at and pid.isdigit() else None

    def acquire(self) -> bool:
        # the link's target names this process (a forked worker is its own holder); only this class
        # reads it back, Optuna never follows it
        self._lock_target_file = f"{self._path}{self.SEP}{os.getpid()}@{socket.gethostname()}"
        sleep_s = 0.001
        while True:
            try:
                os.symlink(self._lock_target_file, self._lock_file)
                return True
            except OSError as e:
                if e.errno != errno.EEXIST:
                    raise
            who = self.holder()
            if who is None:  # an old lock, or one Optuna made: its own wait and grace period
                return super().acquire()
            pid, host = who
            if host == socket.gethostname() and not _alive(pid):
                try:
                    self.release()  # a dead holder's: take it now (another waiter may have been first)
                except RuntimeError:
                    pass
                continue
            if sleep_s < 1:  # a live holder: a journal write takes milliseconds
                time.sleep(sleep_s)
                sleep_s *= 2
                continue
            return super().acquire()  # one that takes long: Optuna's wait and grace period
