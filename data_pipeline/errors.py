"""Errors caused by what the user gave us, reported as one line naming the option or file and the fix.

Every floor of the project raises its own kind (``DataError`` here, ``parallel.layout.LayoutError``,
``pretrain.config.ConfigError``); the command-line tools catch ``UsageError`` and print the message
instead of a traceback. It lives on the bottom floor so that every floor can derive from it.
"""


class UsageError(ValueError):
    """Bad input from the user; the message names the problem and the fix."""


class DataError(UsageError):
    """Bad input data (a corpus, a shard, a manifest)."""
