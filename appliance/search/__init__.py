"""Web search, off by default (SEARCH_ENABLED): providers and what a search may send and give.

Used by `appliance.http` (chat and the OpenAI API), never the reverse.

- `config`: the settings as `SearchConfig`, checked at start (a leaf).
- `provider`: the provider interface; `searxng` (SearXNG's JSON API) and `brave` (an
  API-key service) implement it; `providers` names them.
- `service`: `WebSearch`, the supervised client: timeout, size limit, logging by hash.
- `results`: untrusted results cleaned into numbered `Source`s.
- `query`: the query made of one redacted message; when `auto` searches without tools.
- `context`: the numbered results as prompt context and as a tool result.
- `errors`: failures as 502/504 `SearchError`s naming the provider.
"""
