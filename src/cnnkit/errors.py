"""User-facing errors: one line that says what is wrong and what to do."""
from __future__ import annotations

import difflib
import sys
import warnings


class CnnkitError(Exception):
    """A problem with the user's input or environment. The CLI prints it as one line and
    exits with `exit_code`."""
    exit_code = 1


class SettingsError(CnnkitError):
    """A setting is invalid; found before any data is loaded or any work is done."""
    exit_code = 2


class DownloadError(CnnkitError):
    """A data set or weights file could not be downloaded (usually: no network)."""


class Interrupted(CnnkitError):
    """Training was stopped by Ctrl-C or SIGTERM; the last completed epoch is saved."""
    exit_code = 130


class CnnkitWarning(UserWarning):
    """Something the user should know, which did not stop the job (e.g. skipped files)."""


def first_line(e: BaseException, limit: int | None = None) -> str:
    """A library's exception as one line for a one-line error: its message's first line
    (cut at `limit` characters), or its type's name when it has no message."""
    text = str(e)
    return text.splitlines()[0][:limit] if text else type(e).__name__


def unknown_choice(kind: str, name, choices) -> SettingsError:
    """'unknown model 'resnt9' (did you mean resnet9?); choose one of: ...'"""
    choices = [str(c) for c in choices]
    close = difflib.get_close_matches(str(name), choices, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return SettingsError(f"unknown {kind} {name!r}{hint}; choose one of: {', '.join(choices)}")


def one_line_warnings() -> None:
    """Warnings print as one line, "cnnkit: warning: ...", with no source line."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"cnnkit: warning: {message}", file=sys.stderr)
    warnings.showwarning = show
