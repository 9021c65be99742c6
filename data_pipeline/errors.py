"""Bad input data (a corpus, a shard, a manifest): a ``common.errors.UsageError``."""

from common.errors import UsageError


class DataError(UsageError):
    """Bad input data (a corpus, a shard, a manifest); the message names the file and the fix."""
