"""Errors that end a command with one line, importable without torch or Flower.

The CLI checks the config before it loads the heavy stack, so a bad value fails in about a
second; these classes must therefore live where importing them costs nothing.
"""

from __future__ import annotations


class ModelError(ValueError):
    """The model cannot be loaded or wrapped; the message starts with the config key."""


class LaunchError(RuntimeError):
    """The engine could not be started or the run did not finish; one-line message."""
