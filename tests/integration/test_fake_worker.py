"""The fake worker (tests/fake_worker.py) answers in the shapes a real worker process does.

openapi.yaml's schemas allow more than a real worker sends (extra keys, optional
ones); this compares the fake's answers key by key with a real worker's, so that a
field the worker adds or drops shows up here before the fast tier drifts from it.
Values may differ (the fake is a fixed machine); a null on either side matches
anything (e.g. the real worker's prompt cache, which the fake reports as off).
"""

from __future__ import annotations

import json
import ssl
from typing import Any

import aiohttp
from fake_worker import FakeWorker
from worker_process import WorkerProcess, tls_closed


def shape(value: Any) -> Any:
    """Keys and kinds of a JSON value: dicts by key, lists by their first item."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    if value is None:
        return None
    return (
        "number"
        if isinstance(value, int | float) and not isinstance(value, bool)
        else type(value).__name__
    )


def differences(real: Any, fake: Any, path: str = "") -> list[str]:
    """Where two shapes differ (None on either side matches anything)."""
    if real is None or fake is None:
        return []
    if isinstance(real, dict) and isinstance(fake, dict):
        found = [f"{path}.{key}: only the real worker has it" for key in real.keys() - fake]
        found += [f"{path}.{key}: only the fake has it" for key in fake.keys() - real]
        for key in real.keys() & fake.keys():
            found += differences(real[key], fake[key], f"{path}.{key}")
        return found
    if isinstance(real, list) and isinstance(fake, list):
        if real and fake:
            return differences(real[0], fake[0], f"{path}[0]")
        return []
    return [] if real == fake else [f"{path}: {real} (real) vs {fake} (fake)"]


class Client:
    """GET and streamed POST against one worker, as the integration calls them."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        url: str,
        headers: dict[str, str],
        context: ssl.SSLContext | None,
    ) -> None:
        self.http, self.url, self.headers, self.context = http, url, headers, context

    async def get(self, path: str) -> Any:
        async with self.http.get(
            self.url + path, headers=self.headers, ssl=self.context or False
        ) as response:
            assert response.status == 200, await response.text()
            return await response.json()

    async def stream(self, model: str) -> list[dict[str, Any]]:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        async with self.http.post(
            self.url + "/v1/chat/completions",
            json=body,
            headers=self.headers,
            ssl=self.context or False,
        ) as response:
            assert response.status == 200, await response.text()
            events = [
                line.decode().removeprefix("data: ").strip()
                async for line in response.content
                if line.startswith(b"data: ")
            ]
        assert events[-1] == "[DONE]"
        return [json.loads(event) for event in events[:-1]]


def by_model(answer: dict[str, Any]) -> dict[str, Any]:
    """Capacity with its per-model rates as a list (model ids differ)."""
    return {**answer, "models": list(answer["models"].values())}


async def test_fake_answers_like_a_real_worker(
    chat_worker: WorkerProcess, fake: FakeWorker
) -> None:
    pinned = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    pinned.check_hostname = False
    pinned.load_verify_locations(cafile=str(fake.certificate.cert_path))
    async with aiohttp.ClientSession() as http:
        real = Client(http, chat_worker.url, chat_worker.headers, chat_worker.ssl)
        faked = Client(http, fake.url, fake.headers, pinned)
        found: list[str] = []
        for path in ("/v1/health", "/v1/info", "/v1/models"):
            found += differences(shape(await real.get(path)), shape(await faked.get(path)), path)
        found += differences(
            shape(by_model(await real.get("/v1/capacity"))),
            shape(by_model(await faked.get("/v1/capacity"))),
            "/v1/capacity",
        )
        real_model = (await real.get("/v1/info"))["models"][0]["id"]
        real_chunks = await real.stream(real_model)
        fake_chunks = await faked.stream(fake.model)
        # the role chunk, the finish chunk and the usage chunk; a text chunk if the
        # (random) real model wrote one
        pairs = [(real_chunks[0], fake_chunks[0]), (real_chunks[-2], fake_chunks[-2])]
        pairs.append((real_chunks[-1], fake_chunks[-1]))
        if len(real_chunks) > 3:
            pairs.append((real_chunks[1], fake_chunks[1]))
        for real_chunk, fake_chunk in pairs:
            found += differences(shape(real_chunk), shape(fake_chunk), "chunk")
    assert not found, "\n".join(found)
    await tls_closed()
