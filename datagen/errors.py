"""Errors a user can act on.

``DatagenError`` carries a one-line message meant for the person at the terminal: the
CLI prints it as ``error: <message>`` and exits non-zero, without a traceback. Anything
else that escapes is a bug and keeps its traceback. The exit codes every verb shares
are here too.
"""

EXIT_ERROR = 1  # a DatagenError
EXIT_USAGE = 2  # a bad command line (argparse's own)
EXIT_FAILED_ROWS = 3  # the run finished, but some rows failed at the teacher
EXIT_INTERRUPTED = 130  # stopped by Ctrl-C / SIGTERM; what was committed is kept


class DatagenError(Exception):
    """A problem with the user's input or environment, described in one line."""


class ConfigError(DatagenError):
    """The job file (or a file it points to) is invalid."""


class OutputError(DatagenError):
    """The output directory cannot be used or is not a datagen output."""


class MissingExtra(DatagenError):
    """An optional dependency is needed for what was asked."""

    def __init__(self, package: str, extra: str, why: str):
        super().__init__(
            f"{why} needs the '{package}' package: install it with "
            f"`pip install 'datagen[{extra}]'` (or `make install` for the CPU stack)"
        )


def remote_cause(exc: BaseException) -> str:
    """The last line of a remote (Ray) traceback: the error the user can act on."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or "error" in line:
            return line[:300]
    return lines[-1][:300] if lines else type(exc).__name__
