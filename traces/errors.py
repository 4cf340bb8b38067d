"""The base of every error waitlens raises on purpose about its input.

A `WaitlensError` means "this input (file, config key, option, model) cannot be used, and the
message says which and why"; the command line prints it as one line and exits 2. Anything
else escaping a command is a bug and surfaces as one (a traceback). Lower layers import it
from here (traces is the bottom layer), so every package can raise it.
"""

from __future__ import annotations


class WaitlensError(ValueError):
    """Bad input, named in the message (a file and line, a config key, an option, a model).

    Subclasses ValueError, so code that caught ValueError keeps working."""
