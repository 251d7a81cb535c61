"""Conversations longer than the model's context: which turns the prompt keeps.

The policy: a conversation whose rendered prompt, plus room for the answer, does not fit
the context leaves its oldest turns out of the prompt. Every system message stays; of the
other messages the most recent ones that fit are kept, and the kept part starts with a
user turn (chat templates expect turns to alternate from the user's). The room kept for
the answer is max_tokens, but at most a quarter of the context. When even the last turn
does not fit beside the system messages with that room, the fewest turns are kept that
leave one token for the answer; when not even that fits, the request is refused
(`DoesNotFit`). Nothing here changes what is stored: only what the model reads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

from appliance.llm.protocol import ChatMessage

# At most this share of the context is kept for the answer (1/4).
ANSWER_ROOM_DIVISOR: Final = 4


class DoesNotFit(Exception):
    """Even the last turn with the system messages leaves no token for the answer."""

    def __init__(self, tokens: int, n_ctx: int) -> None:
        super().__init__(f"{tokens} tokens do not fit a context of {n_ctx}")
        self.tokens = tokens
        self.n_ctx = n_ctx


def answer_room(n_ctx: int, max_tokens: int) -> int:
    return max(1, min(max_tokens, n_ctx // ANSWER_ROOM_DIVISOR))


def fit_conversation(
    messages: Sequence[ChatMessage],
    render: Callable[[list[ChatMessage]], list[int]],
    n_ctx: int,
    max_tokens: int,
) -> tuple[list[int], int]:
    """The prompt's tokens and how many turns (non-system messages) were left out.

    `render` turns messages into prompt tokens (the chat template and the tokenizer); it is
    called O(log n) times for n turns (a binary search over where the kept part starts).
    """
    room = answer_room(n_ctx, max_tokens)
    tokens = render(list(messages))
    if len(tokens) + room <= n_ctx:
        return tokens, 0
    turns = [i for i, message in enumerate(messages) if message.role != "system"]
    # How many of the oldest turns may be left out: never the last one, and the kept part
    # starts with a user turn when there is one to start with.
    cuts = [k for k in range(1, len(turns)) if messages[turns[k]].role == "user"]
    cuts = cuts or list(range(1, len(turns)))

    def without(k: int) -> list[int]:
        dropped = set(turns[:k])
        return render([m for i, m in enumerate(messages) if i not in dropped])

    low, high = 0, len(cuts) - 1
    best: tuple[list[int], int] | None = None
    while low <= high:
        middle = (low + high) // 2
        candidate = without(cuts[middle])
        if len(candidate) + room <= n_ctx:
            best = (candidate, cuts[middle])
            high = middle - 1
        else:
            low = middle + 1
    if best is not None:
        return best
    # Not even the last turn fits with the full room: keep the fewest turns, if they leave
    # the answer a token at least.
    fewest = without(cuts[-1]) if cuts else tokens
    if len(fewest) + 1 <= n_ctx:
        return fewest, cuts[-1] if cuts else 0
    raise DoesNotFit(len(fewest), n_ctx)
