"""The errors a user sees as one line, and the warning for data problems a run survives.

Each layer raises these plainly; the entry points (`vlm.config.reported`) print them on one line and exit 2.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config that cannot run; its message is one line naming the key and what it may be."""


class DataError(RuntimeError):
    """Data a run cannot go on with (a whole pass over the files gave nothing usable); one line naming the files."""


class DataWarning(UserWarning):
    """A data problem the run survives: an unreadable shard, an uneven shard layout, a long run of bad samples."""


class TrainingError(RuntimeError):
    """A run that cannot go on (too many non-finite steps in a row); one line saying why and what was kept."""
