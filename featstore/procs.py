"""Child processes die with their parent.

A worker process blocked on its task queue never notices that the process that feeds it was killed
(kill -9, OOM killer): with fork it holds the queue's write end itself, so no end-of-file ever comes,
and it lives on with its memory (and, with spawn, keeps multiprocessing's resource tracker alive by
holding its pipe). On Linux the kernel can send a signal to a process when its parent dies
(prctl PR_SET_PDEATHSIG); every worker featstore starts asks for SIGKILL that way.

`process_pool` is the ProcessPoolExecutor to use; `die_with_parent(pid)` is for other initializers,
and `preexec_die_with_parent()` for subprocess.Popen(preexec_fn=...).

Caveat (the kernel's): "parent" is the *thread* that started the child. Start workers from a thread
that outlives them (the main thread, as everywhere in featstore), or they are killed when it ends.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor

PR_SET_PDEATHSIG = 1


def _prctl_deathsig() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def die_with_parent(parent_pid: int) -> None:
    """Call first thing in a child: SIGKILL it when `parent_pid` dies. If the parent died before
    this ran (the child was already re-parented), exit now."""
    _prctl_deathsig()
    if os.getppid() != parent_pid:  # the parent died before prctl: no signal will ever come
        os._exit(1)


def _init(parent_pid, initializer, initargs):
    die_with_parent(parent_pid)
    if initializer is not None:
        initializer(*initargs)


def process_pool(max_workers: int | None = None, mp_context=None, initializer=None, initargs=()) \
        -> ProcessPoolExecutor:
    """ProcessPoolExecutor whose workers die with this process."""
    return ProcessPoolExecutor(max_workers=max_workers, mp_context=mp_context, initializer=_init,
                               initargs=(os.getpid(), initializer, tuple(initargs)))


def preexec_die_with_parent():
    """A preexec_fn for subprocess.Popen: the child is SIGKILLed when this process dies. (Its own
    children are its business.)"""
    parent = os.getpid()
    return lambda: die_with_parent(parent)
