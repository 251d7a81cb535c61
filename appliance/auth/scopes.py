"""The scopes an API key may have; light to import (the CLI's parser offers them)."""

from __future__ import annotations

from typing import Final

SCOPES: Final = ("admin", "user")
