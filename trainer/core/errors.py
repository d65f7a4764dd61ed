"""The errors a job reports as one line (`trainer.core.config.run` prints them) instead of a traceback.

Each names the file, key or setting at fault; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem, reported as one line naming the key or file at fault."""


class TrainingError(RuntimeError):
    """A run that stopped on purpose (diverged, too many bad steps), reported as one line."""


class CheckpointError(RuntimeError):
    """A checkpoint that must not (or cannot) be loaded or written, named in one line."""


class DamagedCheckpoint(CheckpointError):
    """A checkpoint whose marker or files are incomplete or unreadable (not hostile: nothing in it was
    refused for what it holds); resuming falls back to the previous intact checkpoint."""


class LaunchError(RuntimeError):
    """A launch that cannot form the job's process group (a launcher variable unset or wrong, a
    rendezvous address that does not resolve, peers that never came), named in one line."""
