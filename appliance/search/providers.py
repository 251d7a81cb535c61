"""The providers by the name APPLIANCE_SEARCH_PROVIDER gives them."""

from __future__ import annotations

from typing import Final

from appliance.search.brave import BraveProvider
from appliance.search.config import SearchConfig
from appliance.search.provider import Provider
from appliance.search.searxng import SearxngProvider

PROVIDER_CLASSES: Final[dict[str, type[Provider]]] = {
    "searxng": SearxngProvider,
    "brave": BraveProvider,
}


def provider_for(config: SearchConfig) -> Provider:
    return PROVIDER_CLASSES[config.provider](config)
