"""The lock of an Optuna journal file that knows its holder.

Optuna's JournalFileSymlinkLock is a symlink created for the few milliseconds of a journal write; a
process killed inside that window leaves it behind, and the next process waits its 30 s grace period
(warning three times) before taking it. Here the link's target names the holder (pid and host), so a
lock whose holder is a dead process on this machine is taken at once; a live or unknown holder is
waited for as Optuna does (its grace period, then taken).
"""
from __future__ import annotations

import errno
import os
import socket
import time

from optuna.logging import get_logger
from optuna.storages.journal import JournalFileSymlinkLock

_logger = get_logger(__name__)


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
        """Optuna's loop, knowing the holder: a dead holder's lock is taken at once; a live (or unknown)
        holder's after `grace_period` seconds in which the link did not change. (Optuna's own loop
        stats the link's target, so a link naming a holder, which points nowhere, would spin in it.)"""
        # the link's target names this process (a forked worker is its own holder); only this class
        # reads it back, Optuna never follows it
        self._lock_target_file = f"{self._path}{self.SEP}{os.getpid()}@{socket.gethostname()}"
        sleep_s, seen, since = 0.001, None, time.monotonic()
        while True:
            try:
                os.symlink(self._lock_target_file, self._lock_file)
                return True
            except OSError as e:
                if e.errno != errno.EEXIST:
                    raise
            who = self.holder()
            if who is not None and who[1] == socket.gethostname() and not _alive(who[0]):
                self._take()  # its holder is dead: nobody will release it
                continue
            try:
                state = (os.lstat(self._lock_file).st_mtime_ns, who)
            except FileNotFoundError:  # released meanwhile
                continue
            if state != seen:
                seen, since = state, time.monotonic()
            elif self.grace_period is not None and time.monotonic() - since > self.grace_period:
                _logger.warning(f"the journal lock {self._lock_file} (held by {who or 'an unknown process'}) has not "
                                f"changed for {self.grace_period} s: forcibly releasing it")
                self._take()
                continue
            time.sleep(sleep_s)
            sleep_s = min(sleep_s * 2, 0.1)

    def _take(self) -> None:
        try:
            self.release()
        except RuntimeError:  # another waiter took it first
            pass
