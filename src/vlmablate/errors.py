"""Errors shared across layers, in a module that imports nothing from the package.

`ConfigError` is raised by the config rules (`config.validate`) and by the code those rules call
(`model.projector_io` reading a projector's metadata), so it lives below both; `config.ConfigError`
still names it.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A composed config that cannot run; the message says what to change."""
