"""Exception types of the package.

Every error a user can cause (bad file, bad config, mismatched checkpoint) is one of these, with a
message that names the file or key, the problem and the fix. Library code raises them; CLIs catch
:class:`SurrogateMDError`, print the message and exit non-zero.
"""

from __future__ import annotations


class SurrogateMDError(Exception):
    """Base class of all user-facing errors."""


class DataError(SurrogateMDError, ValueError):
    """An input trajectory, topology or dataset file is missing, malformed or inconsistent."""


class ConfigError(SurrogateMDError, ValueError):
    """A configuration has an unknown key, a wrong type or an impossible value."""


class CheckpointError(SurrogateMDError, ValueError):
    """A checkpoint is unreadable, of another format version, or does not fit its use."""


class DeviceError(SurrogateMDError, RuntimeError):
    """A requested compute device (e.g. CUDA) is not available."""


class GuardError(SurrogateMDError, RuntimeError):
    """A learned jump produced an unphysical state and the guard action is ``raise``."""


class EngineError(SurrogateMDError, RuntimeError):
    """An MD engine (OpenMM, ASE) cannot run the requested system or settings."""
