"""Property-based fuzzing of the worker's API against its spec, on a real worker process.

schemathesis generates requests from ``addon/hearth_worker/openapi.yaml``: valid
ones (positive) and ones that break the spec in one place (negative), each with
the test token and without one. Every answer must be documented by the spec
(status, content type, body schema, headers), no answer may be a 5xx, data the
spec calls invalid must be refused with a 4xx and data it calls valid must not
be (except the few refusals no schema can predict: a prompt too long for the
model's context, a prompt its chat template refuses, a busy worker).

Then what schemathesis does not generate: bodies with deep nesting, integers of
thousands of digits, floats out of range, NaN, and lone surrogates, injected
anywhere into otherwise valid bodies; and headers with NUL and other control
bytes. Each must get a 4xx with an error body (or aiohttp's plain 400 for bad
HTTP). After all of it, the worker's log holds no traceback and no ERROR.

Runs are deterministic (derandomized) and bounded: BODY_EXAMPLES or FEW_EXAMPLES per
operation and mode. The worker serves the tiny chat model with a short context (256
tokens), so a valid chat request that generates costs milliseconds.
"""

from __future__ import annotations

import json
import shutil
import socket
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import positive_data_acceptance
from test_api import SPEC_PATH, check_schema, model_id
from worker_process import WorkerProcess, insecure_ssl, start_worker

# Examples per operation and mode. With a token, what has a body gets the most;
# without one every answer is a 401 (or the public endpoints'), so a few do.
BODY_EXAMPLES = 8
FEW_EXAMPLES = 3
HOSTILE_EXAMPLES = 40
SHORT_CONTEXT = 256
# Statuses valid data may get: the spec cannot know the token, the pairing code,
# the model's context or how busy the worker is.
ACCEPTABLE_FOR_VALID = {401, 403, 404, 413, 429}
# 4xx statuses that refuse invalid data (schemathesis' list, plus 413 for too much).
REJECTING = ["400", "401", "403", "404", "413"]
NO_TOKEN_SKIPS: set[str] = set()
# Revoking the test token would leave the rest of the run unauthenticated; the
# operation is fuzzed without a token (401) and tested on its own in test_auth.py.
TOKEN_SKIPS = {"DELETE /v1/tokens/self"}

pytestmark = pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")

SETTINGS = settings(
    max_examples=FEW_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


def short_context_copy(model: Path, into: Path) -> Path:
    """The model with its manifest's context cut short (generation stays cheap)."""
    copy = into / model.name
    shutil.copytree(model, copy)
    manifest = json.loads((copy / "hearth-model.json").read_text())
    manifest["context_length"] = SHORT_CONTEXT
    (copy / "hearth-model.json").write_text(json.dumps(manifest))
    return copy


@pytest.fixture(scope="module")
def models(tiny_chat_model: Path, embedding_model: Path) -> tuple[str, str]:
    """The ids of the chat and the embedding model the worker serves."""
    return model_id(tiny_chat_model), model_id(embedding_model)


@pytest.fixture(scope="module")
def worker(
    tiny_chat_model: Path,
    embedding_model: Path,
    models: tuple[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[WorkerProcess]:
    chat = short_context_copy(tiny_chat_model, tmp_path_factory.mktemp("fuzz-model"))
    started = start_worker(
        [chat, embedding_model], tmp_path_factory.mktemp("fuzz-worker"), extra=["--no-warmup"]
    )
    yield started
    assert started.stop() == 0, started.log()
    log = started.log()
    assert "Traceback" not in log, log
    assert " ERROR " not in log, log


def assert_clean_log(worker: WorkerProcess) -> None:
    log = worker.log()
    assert "Traceback" not in log, log
    assert " ERROR " not in log, log


def fuzz_schema(worker: WorkerProcess, models: tuple[str, str]) -> Any:
    """The spec, served by `worker`, with `model` naming the models it serves.

    Only `model` is narrowed (to an enum), so that valid requests reach the
    engines; a negative case's other model name still gets a 404, a refusal.
    """
    chat, embedding = models
    raw = yaml.safe_load(SPEC_PATH.read_text())
    schemas = raw["components"]["schemas"]
    schemas["ChatCompletionRequest"]["properties"]["model"] = {"type": "string", "enum": [chat]}
    schemas["EmbeddingRequest"]["properties"]["model"] = {"type": "string", "enum": [embedding]}
    config = SchemathesisConfig.from_dict(
        {
            "base-url": worker.url,
            "tls-verify": False,  # HTTPS as the worker serves it; TLS has its own tests
            "checks": {"negative_data_rejection": {"expected-statuses": REJECTING}},
        }
    )
    return schemathesis.openapi.from_dict(raw, config=config)


def check_valid_data_accepted(response: Any, mode: GenerationMode) -> None:
    """schemathesis' positive_data_acceptance, with the refusals no spec can predict."""
    status = response.status_code
    if mode is not GenerationMode.POSITIVE or status < 300 or status in ACCEPTABLE_FOR_VALID:
        return
    if status == 400 and response.headers.get("content-type", [""])[0].startswith("text/plain"):
        # Malformed HTTP, refused by aiohttp: the generator's "valid" header value
        # (e.g. a bearer token) held a control byte, which no HTTP server takes.
        sent = "".join(str(v) for v in response.request.headers.values())
        assert any(c in sent for c in CONTROL), f"plain 400 for clean headers: {response.text}"
        return
    error = response.json()["error"] if status == 400 else {}
    # tool_not_offered: a named tool_choice must name one of `tools`, which no schema says.
    # Transcriptions: a schema says "binary", not "a 16-bit PCM WAV file" (generated bytes
    # are not one), and cannot say that raw audio needs the `model` query parameter
    # while a form carries it as a field.
    unpredictable = error.get("code") in (
        "context_length_exceeded",
        "too_many_tokens",
        "tool_not_offered",
        "unsupported_audio_format",
        "model_required",
    ) or str(error.get("message", "")).startswith("Cannot build the prompt")
    assert unpredictable, f"valid data refused with {status}: {response.text}"


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
@pytest.mark.parametrize("token", [True, False], ids=["token", "no-token"])
def test_the_api_matches_its_spec(
    worker: WorkerProcess, models: tuple[str, str], mode: GenerationMode, token: bool
) -> None:
    schema = fuzz_schema(worker, models)
    headers = worker.headers if token else {}
    session = requests.Session()
    session.verify = False
    calls = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.label in (TOKEN_SKIPS if token else NO_TOKEN_SKIPS):
            continue
        public = not list(operation.security.iter_parameters())
        examples = BODY_EXAMPLES if operation.body and (token or public) else FEW_EXAMPLES

        @settings(SETTINGS, max_examples=examples)
        @given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case: Any) -> None:
            nonlocal calls
            calls += 1
            response = case.call(base_url=worker.url, session=session, headers=headers, timeout=60)
            assert response.status_code < 500, response.text
            case.validate_response(
                response, headers=headers, excluded_checks=[positive_data_acceptance]
            )
            check_valid_data_accepted(response, mode)

        try:
            fuzz()
        except Unsatisfiable:
            # Nothing to break: no parameters, no body and no token to send (GET /v1/health).
            assert mode is GenerationMode.NEGATIVE
            assert not (operation.body or operation.query or operation.headers), operation.label
    session.close()
    assert calls >= FEW_EXAMPLES
    assert_clean_log(worker)


# -- what schemathesis does not generate ---------------------------------------

SENTINEL = "hearth-fuzz-sentinel"
ASCII_TEXT = st.text(alphabet=string.ascii_letters + string.digits + " ", max_size=8)


@st.composite
def lone_surrogate(draw: st.DrawFn) -> str:
    """A JSON string with an unpaired surrogate escape."""
    before, after = draw(ASCII_TEXT), draw(ASCII_TEXT)
    if draw(st.booleans()):
        escape = f"\\u{draw(st.integers(0xD800, 0xDBFF)):04x}"  # high, then no low
        return json.dumps(before)[:-1] + escape + "x" + json.dumps(after)[1:]
    escape = f"\\u{draw(st.integers(0xDC00, 0xDFFF)):04x}"  # a low alone
    return json.dumps(before + "x")[:-1] + escape + json.dumps(after)[1:]


def _nest(depth: int, kind: str) -> str:
    if kind == "arrays":
        return "[" * depth + "]" * depth
    if kind == "objects":
        return '{"a":' * depth + "0" + "}" * depth
    return "[" * depth  # never closed


HOSTILE = st.one_of(
    st.builds(_nest, st.integers(65, 200_000), st.sampled_from(["arrays", "objects", "open"])),
    st.builds(lambda n, sign: sign + "9" * n, st.integers(4301, 6000), st.sampled_from(["", "-"])),
    st.builds(lambda e: f"1e{e}", st.integers(309, 99_999)),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "-1e400"]),
    lone_surrogate(),
    st.builds(lambda key: f"{{{key}: 1}}", lone_surrogate()),
)


def containers(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(value, dict | list):
        yield path
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            yield from containers(item, (*path, key))


def inject(body: dict[str, Any], path: tuple[Any, ...], raw: str) -> bytes:
    """`body` as JSON with the raw JSON text `raw` added to the container at `path`."""
    body = json.loads(json.dumps(body))
    target: Any = body
    for key in path:
        target = target[key]
    if isinstance(target, dict):
        target[SENTINEL] = SENTINEL
    else:
        target.append(SENTINEL)
    text = json.dumps(body)
    assert text.count(f'"{SENTINEL}"') >= 1
    if isinstance(target, dict):
        text = text.replace(f'"{SENTINEL}": "{SENTINEL}"', f'"{SENTINEL}": {raw}', 1)
    else:
        text = text.replace(f'"{SENTINEL}"', raw, 1)
    return text.encode()


def valid_bodies(models: tuple[str, str]) -> dict[str, list[dict[str, Any]]]:
    """Valid bodies per path (checked against the spec), with containers at many depths."""
    chat, embedding = models
    tool = {
        "type": "function",
        "function": {
            "name": "HassTurnOn",
            "parameters": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "area": {"type": "array"}},
            },
        },
    }
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "turn on the light"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "HassTurnOn", "arguments": {}},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "done"},
    ]
    bodies = {
        "/v1/chat/completions": [
            {"model": chat, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            {"model": chat, "messages": history, "tools": [tool], "stop": ["x"], "seed": 3},
        ],
        "/v1/embeddings": [
            {"model": embedding, "input": "hello"},
            {"model": embedding, "input": ["a", "b"], "encoding_format": "base64"},
        ],
        "/v1/pair": [
            {"salt": "00" * 16, "client_nonce": "11" * 16, "proof": "22" * 32},
            {"salt": "ab" * 16, "client_nonce": "cd" * 20, "proof": "ef" * 32, "client_name": "x"},
        ],
        # No voice here: a valid body gets a 404, hostile JSON the others' 400 first.
        "/v1/audio/speech": [
            {"model": "a-voice", "input": "Turn on the light.", "response_format": "pcm"},
            {
                "model": "a-voice",
                "input": "Hi.",
                "voice": "joe",
                "speed": 1.5,
                "sample_rate": 16000,
            },
        ],
    }
    names = {
        "/v1/chat/completions": "ChatCompletionRequest",
        "/v1/embeddings": "EmbeddingRequest",
        "/v1/pair": "PairRequest",
        "/v1/audio/speech": "SpeechRequest",
    }
    for path, examples in bodies.items():
        for body in examples:
            check_schema(body, names[path])
    return bodies


@pytest.mark.parametrize(
    "path",
    ["/v1/chat/completions", "/v1/embeddings", "/v1/pair", "/v1/audio/speech"],
    ids=lambda p: p[4:],
)
@pytest.mark.parametrize("token", [True, False], ids=["token", "no-token"])
def test_hostile_json_is_refused(
    worker: WorkerProcess, models: tuple[str, str], path: str, token: bool
) -> None:
    bodies = valid_bodies(models)[path]
    session = requests.Session()
    headers = {"Content-Type": "application/json", **(worker.headers if token else {})}
    public = path == "/v1/pair"

    @settings(SETTINGS, max_examples=HOSTILE_EXAMPLES if token or public else FEW_EXAMPLES)
    @given(valid=st.sampled_from(bodies), raw=HOSTILE, data=st.data())
    def fuzz(valid: dict[str, Any], raw: str, data: st.DataObject) -> None:
        where = data.draw(st.sampled_from(list(containers(valid))))
        body = inject(valid, where, raw)
        response = session.post(
            worker.url + path, data=body, headers=headers, timeout=60, verify=False
        )
        if not (token or public):
            expected = 401
        elif public and len(body) > 4096:
            expected = 413
        else:
            expected = 400
        assert response.status_code == expected, (body[:300], response.text)
        check_schema(response.json(), "Error")

    fuzz()
    session.close()
    assert_clean_log(worker)


CONTROL = [chr(c) for c in [*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F]]


@st.composite
def bad_header(draw: st.DrawFn) -> bytes:
    """A header line with a NUL or another control byte in its name or value."""
    name = draw(st.text(alphabet=string.ascii_letters + "-", min_size=1, max_size=12))
    value = draw(ASCII_TEXT)
    bad = draw(st.sampled_from(CONTROL if draw(st.booleans()) else ["\x00"]))
    at = draw(st.integers(0, len(value)))
    if draw(st.booleans()):
        value = value[:at] + bad + value[at:]
    else:
        name = name[:1] + bad + name[1:]
    return f"{name}: {value}\r\n".encode("latin-1")


@settings(SETTINGS, max_examples=HOSTILE_EXAMPLES)
@given(
    header=bad_header(),
    path=st.sampled_from(["/v1/health", "/v1/info", "/v1/pair", "/v1/chat/completions"]),
    method=st.sampled_from(["GET", "POST"]),
)
def test_control_bytes_in_headers_are_a_400(
    worker: WorkerProcess, header: bytes, path: str, method: str
) -> None:
    request = (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode()
        + header
        + b"Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    with (
        socket.create_connection(("127.0.0.1", worker.port), timeout=30) as raw,
        insecure_ssl().wrap_socket(raw) as tls,
    ):
        tls.sendall(request)
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
    assert answer[:13] in (b"HTTP/1.1 400 ", b"HTTP/1.0 400 "), (header, answer[:200])
    assert_clean_log(worker)
