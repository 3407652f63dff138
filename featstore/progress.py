"""Progress for long commands: a rich bar on a terminal; plain periodic lines otherwise (cluster logs,
pipes), one every 10% of the items, so a log shows a run is alive without depending on wall time."""
from __future__ import annotations

import time

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

STEP = 0.10  # a plain line each time another 10% of the items is done


class Ticker:
    """with Ticker("embed", console) as t: t.update(done, total, what="", rate="")"""

    def __init__(self, label: str, console: Console, tty: bool | None = None):
        self.label, self.console = label, console
        self.tty = console.is_terminal if tty is None else tty
        self.prog = None
        self._next = 0.0  # fraction of total at which the next plain line is due
        self._done, self._total, self._what = 0, None, ""
        self._start = time.monotonic()

    def __enter__(self):
        if self.tty:
            self.prog = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                 TimeRemainingColumn(), console=self.console, transient=False)
            self.prog.__enter__()
            self.task = self.prog.add_task(self.label, total=None, rate="")
        return self

    def __exit__(self, *exc):
        if self.prog is not None:
            return self.prog.__exit__(*exc)
        return False

    def stop(self):
        """Hand the terminal to something that draws its own progress (Ray Data)."""
        if self.prog is not None:
            self.prog.stop()

    def elapsed(self) -> float:
        return time.monotonic() - self._start

    def advance(self, n: int, total: int | None = None):
        self.update(self._done + n, self._total if total is None else total, self._what)

    def update(self, done: int, total: int | None, what: str = "", rate: str = ""):
        if what != self._what:  # a new phase (hashing, then comparing): its own 0..100%
            self._what, self._next = what, 0.0
        self._done, self._total = done, total
        desc = f"{self.label} {what}".strip()
        if self.prog is not None:
            # a phase may be named after data (a file, a source): escaped, never read as rich markup
            self.prog.update(self.task, completed=done, total=total, description=escape(desc), rate=escape(rate))
            return
        if not total or done / total + 1e-12 < self._next:
            return
        self.console.print(f"{desc}: {done}/{total} ({100 * done / total:.0f}%)" + (f", {rate}" if rate else "")
                           + f", {self.elapsed():.0f}s elapsed", markup=False, highlight=False, soft_wrap=True)
        # next line at the next 10% mark; none after 100% of this phase
        self._next = 2.0 if done >= total else (int(done / total / STEP + 1e-9) + 1) * STEP


def silent(label: str) -> Ticker:
    """A Ticker that shows nothing: the default of a job run from Python."""
    import io

    return Ticker(label, Console(file=io.StringIO()), tty=False)
