"""The base class of every error a user can fix: its message names the file, key or limit."""

from __future__ import annotations


class DeblurError(Exception):
    """Bad input or configuration; stage scripts print the message as one ``error:`` line and exit 1."""


class CheckpointError(DeblurError, RuntimeError):
    """A checkpoint is missing, unreadable or does not fit the model."""
