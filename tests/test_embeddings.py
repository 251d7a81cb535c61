"""Embeddings (appliance.llm.embedding and POST /v1/embeddings) on the real llama.cpp.

The worker's vectors are llama-cpp-python's own (`Llama.embed` with mean pooling on the
same file); the API takes texts and token ids, answers floats or base64, counts the
tokens against the key's budget, refuses inputs the model cannot embed by their index,
and a long embedding request does not stop a generation that runs meanwhile.
"""

from __future__ import annotations

import base64
import struct
from typing import Any

import llama_cpp
import numpy as np
import trio

from appliance.llm.embedding import Embedder
from tests.harness import running_daemon, short_tempdir
from tests.real_model import install_smollm2

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "blue", "quantum field theory"]


def _normalized(vectors: Any) -> Any:
    array = np.asarray(vectors, dtype=np.float64)
    return array / np.linalg.norm(array, axis=1, keepdims=True)


def test_the_workers_vectors_are_llama_cpp_pythons() -> None:
    from llama_cpp._internals import LlamaModel

    path = str(install_smollm2(short_tempdir("em"), "smol"))
    reference = llama_cpp.Llama(
        path,
        embedding=True,
        pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
        n_ctx=512,
        n_threads=2,
        verbose=False,
    )
    expected = _normalized(reference.embed(TEXTS))
    model = LlamaModel(
        path_model=path, params=llama_cpp.llama_model_default_params(), verbose=False
    )
    embedder = Embedder(model, n_ctx=512, n_threads=2)
    try:
        inputs = [list(model.tokenize(t.encode(), add_bos=True, special=False)) for t in TEXTS]
        parts = list(embedder.parts(inputs))
    finally:
        embedder.close()
        model.close()
    got = np.concatenate(
        [np.frombuffer(p.vectors, dtype="<f4").reshape(p.count, p.dims) for p in parts]
    )
    cosines = np.sum(_normalized(got) * expected, axis=1)
    assert cosines.min() > 0.999, cosines


async def test_embeddings_api_inputs_formats_budget_and_a_generation_alongside() -> None:
    state = short_tempdir()
    install_smollm2(state / "models", "smol")
    env = {"APPLIANCE_DEFAULT_MODEL": "smol", "APPLIANCE_PARALLEL": "4"}
    with trio.fail_after(600):
        async with (
            running_daemon(env, state_dir=state) as daemon,
            daemon.client(timeout=300) as client,
        ):
            floats = await client.post("/v1/embeddings", json={"model": "smol", "input": TEXTS})
            assert floats.status_code == 200, floats.text
            body = floats.json()
            assert [item["index"] for item in body["data"]] == [0, 1, 2, 3]
            vectors = np.asarray([item["embedding"] for item in body["data"]])
            assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
            assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 4
            # base64: each vector's little-endian float32 bytes.
            packed = await client.post(
                "/v1/embeddings",
                json={"model": "smol", "input": TEXTS[0], "encoding_format": "base64"},
            )
            raw = base64.b64decode(packed.json()["data"][0]["embedding"])
            unpacked = struct.unpack(f"<{len(raw) // 4}f", raw)
            assert np.allclose(unpacked, vectors[0], atol=1e-5)
            # Token ids, one list or several.
            ids = [[1, 2, 3, 4], [5, 6, 7]]
            by_ids = await client.post("/v1/embeddings", json={"model": "smol", "input": ids})
            assert by_ids.status_code == 200 and len(by_ids.json()["data"]) == 2
            assert by_ids.json()["usage"]["prompt_tokens"] == 7
            one = await client.post("/v1/embeddings", json={"model": "smol", "input": ids[0]})
            assert one.status_code == 200 and len(one.json()["data"]) == 1
            # What the model cannot embed is refused by its index.
            for bad, param in (
                (["fine", "x " * 5000], "input"),
                ([[1, 2], [10**9]], "input"),
            ):
                refused = await client.post("/v1/embeddings", json={"model": "smol", "input": bad})
                assert refused.status_code == 400, refused.text
                assert refused.json()["error"]["param"] == param
                assert "input[1]" in refused.json()["error"]["message"]

            # A long embedding request while a generation streams: the generation goes on.
            chat = {
                "model": "smol",
                "messages": [{"role": "user", "content": "Write a long story."}],
                "max_tokens": 400,
                "stream": True,
            }
            arrived: list[float] = []
            window: list[float] = []
            streaming = trio.Event()

            async def generation() -> None:
                async with client.stream("POST", "/v1/chat/completions", json=chat) as answer:
                    async for line in answer.aiter_lines():
                        if line.startswith("data: {"):
                            arrived.append(trio.current_time())
                            if len(arrived) == 3:
                                streaming.set()

            async def embedding() -> None:
                await streaming.wait()
                window.append(trio.current_time())
                texts = [f"sentence number {i} about the sea" for i in range(512)]
                done = await client.post("/v1/embeddings", json={"model": "smol", "input": texts})
                window.append(trio.current_time())
                assert done.status_code == 200 and len(done.json()["data"]) == 512

            async with trio.open_nursery() as nursery:
                nursery.start_soon(generation)
                nursery.start_soon(embedding)
            during = [t for t in arrived if window[0] < t < window[1]]
            assert during, (window, arrived[:5])

            # The tokens count against the key's budget.
            small = await daemon.create_key("small", "user", tokens_per_day=40)
            async with daemon.client(key=small) as limited:
                first = await limited.post("/v1/embeddings", json={"model": "smol", "input": "hi"})
                assert first.status_code == 200, first.text
                spent = (await limited.get("/api/v1/usage")).json()["local"]["day"]
                assert spent == first.json()["usage"]["total_tokens"] > 0
                big = await limited.post(
                    "/v1/embeddings", json={"model": "smol", "input": ["a long text " * 20] * 3}
                )
                assert big.status_code == 429, big.text
                assert big.json()["error"]["code"] == "budget_exhausted"
