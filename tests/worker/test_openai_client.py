"""The official `openai` client works against a worker unchanged.

The worker serves HTTPS with its own self-signed certificate: a client trusts
exactly that certificate (README: "Using a worker from an OpenAI client"),
here `worker.ssl`, i.e. `ssl.create_default_context(cafile=<tls-cert.pem>)`
with `check_hostname = False`, passed as `httpx.AsyncClient(verify=...)`.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from worker_process import WorkerProcess, generators_closed


def _id(path: Path) -> str:
    return str(json.loads((path / "hearth-model.json").read_text())["name"])


@pytest.fixture
async def client(shared_worker: WorkerProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=shared_worker.url + "/v1",
        api_key=shared_worker.token,
        http_client=httpx.AsyncClient(verify=shared_worker.ssl),
    )


async def test_certificate_must_be_trusted(shared_worker: WorkerProcess) -> None:
    """Without the worker's certificate a standard client refuses the connection."""
    assert shared_worker.url.startswith("https://")
    async with openai.AsyncOpenAI(
        base_url=shared_worker.url + "/v1", api_key=shared_worker.token, max_retries=0
    ) as untrusting:
        with pytest.raises(openai.APIConnectionError):
            await untrusting.models.list()


async def test_models_chat_and_stream(client: openai.AsyncOpenAI, tiny_chat_model: Path) -> None:
    async with client:
        models = await client.models.list()
        assert _id(tiny_chat_model) in {m.id for m in models.data}
        messages: list[openai.types.chat.ChatCompletionMessageParam] = [
            {"role": "system", "content": "You are Hearth."},
            {"role": "user", "content": "hello"},
        ]
        whole = await client.chat.completions.create(
            model=_id(tiny_chat_model), messages=messages, max_tokens=16
        )
        assert whole.choices[0].message.role == "assistant"
        assert whole.usage is not None and whole.usage.completion_tokens <= 16
        stream = await client.chat.completions.create(
            model=_id(tiny_chat_model),
            messages=messages,
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage:
                usage = chunk.usage
        assert text == whole.choices[0].message.content
        assert usage is not None and whole.usage.prompt_tokens_details is not None
        assert usage.model_dump(exclude={"prompt_tokens_details"}) == whole.usage.model_dump(
            exclude={"prompt_tokens_details"}
        )
        # The same prompt again: the first request's KV cache is reused (prompt cache).
        assert usage.prompt_tokens_details is not None
        assert 0 < (usage.prompt_tokens_details.cached_tokens or 0) < usage.prompt_tokens
        del stream, chunk
    await generators_closed()


async def test_errors_map_to_openai_exceptions(
    client: openai.AsyncOpenAI, shared_worker: WorkerProcess
) -> None:
    async with client:
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(
                model="no-such-model", messages=[{"role": "user", "content": "x"}]
            )
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="x", messages=[])
    async with openai.AsyncOpenAI(
        base_url=shared_worker.url + "/v1",
        api_key="hearth_wrong",
        max_retries=0,
        http_client=httpx.AsyncClient(verify=shared_worker.ssl),
    ) as wrong:
        with pytest.raises(openai.AuthenticationError):
            await wrong.models.list()


async def test_embeddings(client: openai.AsyncOpenAI, embedding_model: Path) -> None:
    async with client:
        result = await client.embeddings.create(
            model=_id(embedding_model), input=["grams of flour", "cups of flour", "a train"]
        )
        vectors = np.array([d.embedding for d in result.data])
        assert vectors.shape == (3, 384)
        assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]
        # The client asks for base64 by default when numpy is installed; both must agree.
        floats = await client.embeddings.create(
            model=_id(embedding_model), input="grams of flour", encoding_format="float"
        )
        np.testing.assert_allclose(floats.data[0].embedding, vectors[0], rtol=1e-5)
