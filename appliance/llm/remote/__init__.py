"""The remote LLM client (REMOTE_LLM_ENABLED): chat completions forwarded to an
OpenAI-compatible server, redacted first. Beside the local worker, with no arrows between
the two.

- `config`: the settings as `RemoteConfig`, and the API key file (a leaf).
- `client`: `RemoteLLM`, the supervised service that owns the HTTP client.
- `stream`: reading its answers, whole or streamed, under the idle timeout.
- `wire`: what the server sends, read defensively (bodies, chunks, events; usage, cost).
- `errors`: its failures as `RemoteError`s that say what to do, never showing the key.
"""
