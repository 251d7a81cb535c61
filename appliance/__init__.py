"""appliance: a private AI assistant for an edge box."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("appliance")
except PackageNotFoundError:  # running from a tree that was not installed
    __version__ = "0.0.0"
