"""Smoke tests for the installed llama.cpp build, run against a tiny random-weight GGUF.

A llama.cpp build compiled for the wrong CPU (e.g. a native build that picked up AMX, which
segfaults in ggml_backend_amx_mul_mat) loads models fine and only crashes at the first decode.
These tests make `make test` fail at once on such a build. The decode runs in a child process,
because a segfault would otherwise take pytest down with it.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest

from tests.tiny_gguf import write_tiny_llama

CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
N_TOKENS = 20

# Loads the model given as argv[1], greedily generates N_TOKENS tokens, prints one JSON line.
_DECODE_SCRIPT = f"""
import json, os, sys, time
import llama_cpp

start = time.perf_counter()
llm = llama_cpp.Llama(
    model_path=sys.argv[1], n_ctx=256, n_threads=os.cpu_count() or 1, verbose=False, seed=1
)
loaded = time.perf_counter()
out = llm.create_completion("the", max_tokens={N_TOKENS}, temperature=0.0)
done = time.perf_counter()
print(json.dumps({{
    "completion_tokens": out["usage"]["completion_tokens"],
    "finish_reason": out["choices"][0]["finish_reason"],
    "text": out["choices"][0]["text"],
    "load_s": loaded - start,
    "generate_s": done - loaded,
}}))
"""


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return write_tiny_llama(path, chat_template=CHAT_TEMPLATE)


def test_decode_does_not_crash(tiny_model: pathlib.Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _DECODE_SCRIPT, str(tiny_model)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        pytest.fail(
            f"llama.cpp killed by {name} while decoding; is the build portable "
            f"(GGML_NATIVE=OFF)? stderr:\n{proc.stderr[-2000:]}"
        )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["completion_tokens"] == N_TOKENS
    assert result["finish_reason"] == "length"
    assert result["text"]


def test_tokenize_round_trip(tiny_model: pathlib.Path) -> None:
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(tiny_model), n_ctx=256, n_threads=os.cpu_count() or 1, verbose=False
    )
    text = "Hello, the water is blue! café ✓"
    tokens = llm.tokenize(text.encode())
    assert tokens[0] == llm.token_bos()
    assert len(tokens) < len(text.encode())  # whole-word pieces were used, not only bytes
    assert llm.detokenize(tokens).decode() == text
    assert llm.metadata["tokenizer.chat_template"] == CHAT_TEMPLATE
