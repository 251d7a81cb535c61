"""How a worker writes a conversation as a prompt when the model has no chat template of
its own (the fallback format), and which of a template's markers are control tokens."""

from __future__ import annotations

import re
from typing import Any, Final

from appliance.llm.protocol import ChatMessage

# A model without a chat template of its own (a base model) gets this format: each turn
# starts with a `### Role:` line, and an answer ends wherever the model writes `###`, so no
# role line ever reaches it (docs/models.md).
FALLBACK_MARKER: Final = "###"
FALLBACK_STOP: Final = [FALLBACK_MARKER]
# What may be a special token's text in a chat template (`<|im_end|>`, `<end_of_turn>`).
_MARKER_TEXT: Final = re.compile(r"<[^<>\s]{1,40}>")


def fallback_prompt(messages: list[ChatMessage]) -> str:
    parts = [f"{FALLBACK_MARKER} {m.role.capitalize()}:\n{m.content}\n" for m in messages]
    return "".join(parts) + f"{FALLBACK_MARKER} Assistant:\n"


def template_markers(model: Any, template: str) -> dict[str, int]:
    """The control tokens the template writes (its turn markers), by text: the batcher ends
    an answer at one of them, and their texts are stop strings for a model that spells one
    out of ordinary tokens."""
    import llama_cpp as llama

    markers = {}
    for text in sorted(set(_MARKER_TEXT.findall(template))):
        tokens = list(model.tokenize(text.encode("utf-8"), add_bos=False, special=True))
        if len(tokens) == 1 and llama.llama_vocab_is_control(model.vocab, tokens[0]):
            markers[text] = tokens[0]
    return markers
