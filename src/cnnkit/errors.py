"""User-facing errors: one line that says what is wrong and what to do."""


class CnnkitError(Exception):
    """A problem with the user's input or environment. The CLI prints it as one line."""


class DownloadError(CnnkitError):
    """A data set or weights file could not be downloaded (usually: no network)."""


class CnnkitWarning(UserWarning):
    """Something the user should know, which did not stop the job (e.g. skipped files)."""
