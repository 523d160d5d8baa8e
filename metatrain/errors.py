"""The one exception type a user is meant to read."""


class MetatrainError(Exception):
    """A problem the user can fix (missing data, impossible settings, a foreign
    checkpoint). The CLI prints its message as one line and exits with code 2."""
