"""What a command tells its user when it cannot do its job. Each kind has its exit status; the CLI
turns any of them into one line on stderr and that status, in one place (cli.Commands), so a job
object never exits and a library caller catches ordinary exceptions."""
from __future__ import annotations


class CommandError(Exception):
    """One line for the user, no traceback. exit_code: the kind's, unless given."""

    exit_code = 1
    label = "error"

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UserError(CommandError):
    """Bad input, or a state the user must change first (no store, a busy one, a missing file): 2."""

    exit_code = 2


class Failed(CommandError):
    """The work ran and did not succeed (a file that cannot be read, a full store): 1."""


class SqlFailed(Failed):
    """The user's SQL failed or was refused by the sandbox: 1."""

    label = "SQL error"


class NoSpace(CommandError):
    """The disk filled: 3, so a scheduler can tell it from bad input."""

    exit_code = 3


class Interrupted(CommandError):
    """Ctrl-C (or SIGTERM where a job turns it into one): 130, what was kept and how to resume."""

    exit_code = 130
    label = "interrupted"


def disk_full(e: BaseException | None) -> bool:
    """Whether e (or what caused it) is a full disk or quota: DuckDB says so in its text only. (Here, not in
    featstore.store, so that the command line checks an error without importing DuckDB.)"""
    import errno

    while e is not None:
        if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(
                m in str(e) for m in ("No space left on device", "Disk quota exceeded")):
            return True
        e = e.__cause__ or e.__context__
    return False
