"""Errors in input data, reported to the user as one line naming the file and the fix."""


class DataError(ValueError):
    pass
