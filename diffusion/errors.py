"""The errors a user can act on, in one place. Each message names the file, key or value and says what to do.

Entry points (``diffusion.cli``) turn these into one line and exit status 2, never a traceback. Anything else that
escapes is a bug and keeps its traceback. The data layer (``datasets``) has two of its own, because it knows nothing
of this package: ``datasets.images.BadImageError`` and ``datasets.folder.DatasetLayoutError``.
"""

from __future__ import annotations

from typing import Tuple, Type


class DiffusionError(Exception):
    """Base of every error meant for the user rather than a bug report."""


class ConfigError(DiffusionError, ValueError):
    """A configuration problem the user can fix; the message says which key and what to do. ``key`` is the full
    dotted key at fault when there is one (so the loader can say whether a file or an override set it)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


class ModelLoadError(DiffusionError, RuntimeError):
    """The weights could not be loaded; the message says from where and what to do."""


class EmbeddingsError(DiffusionError, ValueError):
    """An embedding file is missing, incomplete or does not fit the model; the message says which and what to do."""


class OracleError(DiffusionError, RuntimeError):
    """An oracle folder or its weights cannot be used; the message names the file and what to do."""


class WeightsUnavailableError(OracleError):
    """Pretrained weights (torchvision ImageNet, open_clip) could not be loaded, typically offline."""


class CheckpointError(DiffusionError, RuntimeError):
    """A checkpoint or adapter could not be written or read; the message says which, why, and what is intact."""


class LpipsError(DiffusionError, RuntimeError):
    """LPIPS could not load its backbone weights."""


class ArtefactError(DiffusionError, ValueError):
    """A file the project wrote earlier (embeddings, cache, inversion, checkpoint) is damaged, foreign, or was made by
    another model or setting than this run's; the message names the file and how to recompute it."""


class OutputError(DiffusionError, OSError):
    """An output path cannot be written (read-only, a file in the way, disk full); the message names the path."""


class BusyError(DiffusionError, RuntimeError):
    """Another run holds the lock of the same output folder."""


def user_errors() -> Tuple[Type[BaseException], ...]:
    """Exception types whose message is meant for the user (bad config, data, weights or files), not a bug report."""
    from datasets.folder import DatasetLayoutError, FileListError
    from datasets.images import BadImageError

    return (DiffusionError, BadImageError, DatasetLayoutError, FileListError, FileNotFoundError)


class RunInterrupted(Exception):
    """A run stopped on the user's request (Ctrl-C, SIGTERM) after saving what it had; the message says what was kept
    and how to resume. Entry points exit with status 130 on it."""
