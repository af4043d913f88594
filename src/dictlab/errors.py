"""The one error type the CLI turns into a clean one-line message."""


class DictlabError(Exception):
    """A user-facing error: bad input, a missing file, a config that does not fit."""


class DiskFull(DictlabError):
    """A write ran out of space; what it was writing was removed, so nothing partial is left to trust."""
