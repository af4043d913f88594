"""The one error type the CLI turns into a clean one-line message."""


class DictlabError(Exception):
    """A user-facing error: bad input, a missing file, a config that does not fit."""
