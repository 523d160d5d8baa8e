"""The exception types a user is meant to read."""

import errno
from pathlib import Path


class MetatrainError(Exception):
    """A problem the user can fix (missing data, impossible settings, a foreign
    checkpoint). The CLI prints its message as one line and exits with code 2."""


def at_least_one(counts: dict) -> None:
    """Refuse the first of the counts {config key: value} (tasks, steps, iterations)
    that is below 1; a value of None is a key the learner does not have."""
    for key, value in counts.items():
        if value is not None and value < 1:
            raise MetatrainError(f"{key}={value} must be at least 1")


# errno values that mean the disk (or the user's quota) is full.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(MetatrainError):
    """No space left (or quota exceeded) while writing `path`; the old file, if
    any, is untouched. train() adds which checkpoint is the last intact one."""

    def __init__(self, path: Path):
        self.path = Path(path)
        super().__init__(f"no space left on the device while writing {self.path}")
