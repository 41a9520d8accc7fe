"""User-facing errors and the exit codes the CLI maps them to."""

from __future__ import annotations

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_USAGE = 2
EXIT_IMAGES_FAILED = 3
EXIT_NOTHING_SELECTED = 4


class UserError(Exception):
    """A problem the user can fix (bad config, missing file): printed without a traceback, exit 2."""

    exit_code = EXIT_USAGE


class ConfigError(UserError):
    """A config value is wrong; `key` is the dotted path (e.g. ``explainer.nsamples``)."""

    def __init__(self, key: str, message: str, source: str | None = None) -> None:
        self.key = key
        self.message = message
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key}: {message}" if key else f"{where}{message}")


class NothingSelected(UserError):
    """No file under input.dir matches the include/exclude patterns (a typo'd pattern, an empty
    folder): exit 4, so that a cron job notices. An input whose images are all done exits 0."""

    exit_code = EXIT_NOTHING_SELECTED


class ImageError(Exception):
    """One image could not be read or explained: becomes a row in errors.csv."""
