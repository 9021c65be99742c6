"""Errors caused by what the user gave us, reported as one line naming the option or file and the fix.

Every package raises its own kind (``data_pipeline.errors.DataError``, ``parallel.layout.LayoutError``,
``pretrain.config.ConfigError``, ...); the command-line tools catch ``UsageError`` and print the message
instead of a traceback (exit status 2). It lives on the ground floor so that every package can derive
from it.
"""


class UsageError(ValueError):
    """Bad input from the user; the message names the problem and the fix."""
