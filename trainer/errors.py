"""User-facing trainer errors: the message is one line, printed as ``edge-trainer: error: ...``."""
from __future__ import annotations


class InputError(ValueError):
    """Bad input from the user (file, column, option). The message names the problem in one line."""
