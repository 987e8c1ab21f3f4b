"""The one exception type for mistakes a user can cause and fix."""

from __future__ import annotations


class FedLoraError(Exception):
    """A user-facing error: bad config, bad file, bad shape or rank.

    The message says what was wrong and what to do. The command-line tool prints it
    without a traceback and exits with code 2.
    """
