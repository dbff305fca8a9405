"""openapi.yaml, generated: the operations written here, every schema from `api_types`.

The worker serves the committed openapi.yaml (GET /v1/openapi.yaml);
tests/worker/test_openapi.py checks that it equals what `render()` makes.
Regenerate it with `scripts/openapi` (`python -m hearth_worker.openapi --write`).
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter
from pydantic.json_schema import JsonSchemaMode

from . import api_types
from .validation import MAX_JSON_DEPTH

SPEC_FILE = "openapi.yaml"
_REF = "#/components/schemas/{model}"
# JSON Schema keywords that apply to values of one type only: merging members of an
# anyOf that carry only these (and distinct types) into one `type` list keeps the
# meaning, and keeps the spec's types disjoint (schemathesis generates much faster).
_TYPE_KEYWORDS = {
    "string": {"minLength", "maxLength", "pattern", "format"},
    "array": {"items", "minItems", "maxItems", "prefixItems", "uniqueItems"},
    "object": {"properties", "required", "additionalProperties", "minProperties"},
    "integer": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"},
    "number": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"},
    "boolean": set(),
    "null": set(),
}

DESCRIPTION = f"""\
The contract between the Hearth Home Assistant integration and a Hearth
worker. Chat and embeddings follow OpenAI's shapes, so any OpenAI client
can use a worker too. Every endpoint except /v1/health and /v1/pair needs
`Authorization: Bearer <token>`; a token is obtained by pairing.
Tokens have a scope: the routes that change the machine (pulling and
removing models) need an admin token, else 403 `admin_required`. Tokens
made by pairing are admin; `hearth-worker tokens create NAME` makes one
only with `--admin`.
Workers serve HTTPS with a self-signed certificate made on first start;
clients pin its SHA-256 fingerprint, proven by the pairing exchange
(`hearth_worker/pairing.py`). Plain HTTP only with `--plain-http`.
Errors always have the shape of `Error` and a 4xx status for bad input.
Every request body is a JSON object nested at most {MAX_JSON_DEPTH} levels deep (objects
and arrays), with integers of at most 4300 digits, floats in range, no NaN
or Infinity, and only valid Unicode text (no lone surrogates such as
"\\ud800"); anything else gets a 400 (codes `invalid_json`, `json_too_deep`,
`invalid_unicode`). Other invalid requests get a 400 with code `invalid_request`
(or the code their description names) and `param` naming the parameter.
Malformed HTTP (e.g. a NUL byte in a header) gets a plain-text 400.
"""


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(model=name)}


def _json(schema: str) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(schema)}}


def _responses(ok: dict[str, Any], *errors: str) -> dict[str, Any]:
    shared = {
        "400": "BadRequest",
        "401": "Unauthorized",
        "403": "Forbidden",
        "403a": "AdminRequired",
        "404": "NotFound",
        "408": "RequestTimeout",
        "409": "Conflict",
        "413": "TooLarge",
        "415": "BadRequest",
        "429": "TooManyRequests",
        "503": "Unavailable",
    }
    answers = dict(ok)
    for status in ("400", *errors):
        answers[status[:3]] = {"$ref": f"#/components/responses/{shared[status]}"}
    return answers


def _ok(description: str, schema: str, status: str = "200") -> dict[str, Any]:
    return {status: {"description": description, "content": _json(schema)}}


def _body(schema: str) -> dict[str, Any]:
    return {"required": True, "content": _json(schema)}


MODEL_ID_PARAM = {
    "name": "model_id",
    "in": "path",
    "required": True,
    "schema": _ref("ModelId"),
}
JOB_ID_PARAM = {
    "name": "job_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^pull_[0-9a-f]{16}$"},
}
PREFIX_PARAM = {
    "name": "X-Hearth-Prefix",
    "in": "header",
    "required": False,
    "description": (
        "The client's key for the prompt's household part (Home Assistant: SHA-256,\n"
        "64 hex digits, of the first system message's text and the tools, as\n"
        "canonical JSON). Kept with the cache entry that holds the prompt and listed\n"
        "in /v1/capacity `prompt_cache.warm_keys`; anything else is ignored.\n"
    ),
    "schema": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"},
}

PAIR_DESCRIPTION = """\
protocol hearth-pair-v1: verifier = scrypt(code, "hearth-pair-v1 code" | salt),
key = scrypt(verifier, "hearth-pair-v1 session" | fingerprint | client_nonce),
proof = HMAC-SHA256(key, "client" | fingerprint | client_nonce), where
fingerprint is the SHA-256 of the certificate the client sees (empty for
plain HTTP) and | joins fields each prefixed by its 2-byte length. scrypt
N=2^15, r=8, p=1, 32 bytes. A wrong proof counts as a wrong code. The
answer's proof is HMAC-SHA256(key, "worker" | fingerprint | client_nonce |
sha256(token) | node_id); a client keeps the token only if it matches.
"""

PATHS: dict[str, Any] = {
    "/v1/health": {
        "get": {
            "operationId": "health",
            "security": [],
            "summary": "Liveness; no authentication",
            "responses": _responses(_ok("The worker is up", "Health")),
        }
    },
    "/v1/pair": {
        "get": {
            "operationId": "pairChallenge",
            "security": [],
            "summary": "The first step of the pairing proof - the current code's salt",
            "responses": _responses(_ok("A pairing code is active", "PairChallenge"), "403"),
        },
        "post": {
            "operationId": "pair",
            "security": [],
            "summary": "Prove knowledge of the pairing code (never sent) and get a long-lived "
            "token",
            "description": PAIR_DESCRIPTION,
            "requestBody": _body("PairRequest"),
            "responses": _responses(
                _ok("Paired; the token is shown only this once", "PairResponse"),
                "403",
                "413",
                "429",
            ),
        },
    },
    "/v1/info": {
        "get": {
            "operationId": "info",
            "summary": "Who this worker is and what it serves",
            "responses": _responses(_ok("Node information", "Info"), "401"),
        }
    },
    "/v1/capacity": {
        "get": {
            "operationId": "capacity",
            "summary": "Live spare capacity, for routing",
            "responses": _responses(_ok("Capacity snapshot", "Capacity"), "401"),
        }
    },
    "/v1/models": {
        "get": {
            "operationId": "listModels",
            "summary": "Models served (OpenAI shape)",
            "responses": _responses(_ok("Model list", "ModelList"), "401"),
        }
    },
    "/v1/models/{model_id}": {
        "delete": {
            "operationId": "deleteModel",
            "summary": "Stop serving a model and delete its folder (admin)",
            "description": (
                "New requests for the model get a 404 at once; requests running on it\n"
                "finish first, then it is unloaded and its folder deleted. A model given to\n"
                "the worker with `--model` is not removable (409 `model_not_removable`).\n"
            ),
            "parameters": [MODEL_ID_PARAM],
            "responses": _responses(_ok("Deleted", "ModelDeleted"), "401", "403a", "404", "409"),
        }
    },
    "/v1/models/pull": {
        "post": {
            "operationId": "pullModel",
            "summary": "Start downloading a model from the Hugging Face Hub (admin)",
            "description": (
                "Answers at once with the job (202); poll GET /v1/models/pull/{job_id}.\n"
                "A pull of a source being pulled already answers that job (200). When the\n"
                "job is done the model is served (no restart): /v1/models, /v1/info and\n"
                "/v1/capacity list it. The hub is the one in the worker's HF_ENDPOINT\n"
                "environment variable (default huggingface.co).\n"
            ),
            "requestBody": _body("PullRequest"),
            "responses": _responses(
                {
                    **_ok("This source is being pulled already; its job", "PullJob"),
                    **_ok("Pull started", "PullJob", "202"),
                },
                "401",
                "403a",
                "409",
                "413",
            ),
        }
    },
    "/v1/models/pull/{job_id}": {
        "parameters": [JOB_ID_PARAM],
        "get": {
            "operationId": "getPullJob",
            "summary": "A pull's progress (admin)",
            "description": "Jobs are kept in memory only; a restarted worker knows none.",
            "responses": _responses(_ok("The job", "PullJob"), "401", "403a", "404"),
        },
        "delete": {
            "operationId": "cancelPullJob",
            "summary": "Cancel a pull (admin)",
            "description": (
                "The download stops and the job ends `cancelled`; what was downloaded is\n"
                "kept, so pulling the source again resumes. A job already loading its\n"
                "model (phase `loading`) finishes. Answers the job as it is now.\n"
            ),
            "responses": _responses(_ok("The job", "PullJob"), "401", "403a", "404"),
        },
    },
    "/v1/catalog": {
        "get": {
            "operationId": "catalog",
            "summary": "Models that suit a household, and which fit this machine",
            "description": (
                "The catalog shipped with the worker, each entry with whether it fits this\n"
                "machine's available memory and the free disk where models are kept, whether\n"
                "it is recommended, and whether it is installed here.\n"
            ),
            "responses": _responses(_ok("The catalog for this machine", "Catalog"), "401"),
        }
    },
    "/v1/chat/completions": {
        "post": {
            "operationId": "createChatCompletion",
            "summary": "Chat completion (OpenAI shape); `stream=true` answers with server-sent "
            "events",
            "parameters": [PREFIX_PARAM],
            "requestBody": _body("ChatCompletionRequest"),
            "responses": _responses(
                {
                    "200": {
                        "description": (
                            "A ChatCompletion, or with `stream=true` a `text/event-stream` of\n"
                            "`data: <ChatCompletionChunk JSON>` events ending with "
                            "`data: [DONE]`.\n"
                        ),
                        "content": {
                            **_json("ChatCompletion"),
                            "text/event-stream": {"schema": {"type": "string"}},
                        },
                    }
                },
                "401",
                "404",
                "413",
                "415",
                "429",
            ),
        }
    },
    "/v1/embeddings": {
        "post": {
            "operationId": "createEmbedding",
            "summary": "Sentence embeddings (OpenAI shape)",
            "requestBody": _body("EmbeddingRequest"),
            "responses": _responses(_ok("Embeddings", "EmbeddingList"), "401", "404", "413", "429"),
        }
    },
    "/v1/audio/speech": {
        "post": {
            "operationId": "createSpeech",
            "summary": "Text to speech (OpenAI shape) with the worker's Piper voices; streamed "
            "sentence by sentence",
            "description": (
                "`model` names a voice /v1/models lists with `hearth.kind` `tts`; any other\n"
                "name is a 404 `model_not_found`. The answer is 16-bit mono audio at\n"
                "`sample_rate` (default: the voice's own), sent as each sentence is\n"
                "synthesized (chunked): with `wav` a header of unknown (streaming) length\n"
                "first. The worker keeps no text or audio.\n"
            ),
            "requestBody": _body("SpeechRequest"),
            "responses": _responses(
                {
                    "200": {
                        "description": "The speech, as it is synthesized",
                        "headers": {
                            "X-Hearth-Sample-Rate": {
                                "description": "The audio's sample rate, Hz",
                                "schema": {
                                    "type": "integer",
                                    "minimum": api_types.MIN_SAMPLE_RATE,
                                    "maximum": api_types.MAX_SAMPLE_RATE,
                                },
                            }
                        },
                        "content": {
                            "audio/wav": {"schema": {"type": "string", "format": "binary"}},
                            "audio/pcm": {"schema": {"type": "string", "format": "binary"}},
                        },
                    }
                },
                "401",
                "404",
                "413",
                "503",
            ),
        }
    },
    "/v1/audio/transcriptions": {
        "post": {
            "operationId": "createTranscription",
            "summary": "Speech to text with the worker's Whisper models: OpenAI's form, or "
            "raw audio streamed in",
            "description": (
                "Two forms, one answer. OpenAI's: multipart/form-data with `file` (a WAV\n"
                "file) and `model`. Raw audio, as Home Assistant streams it while the\n"
                "person speaks: `audio/L16; rate=16000; channels=1` (16-bit little-endian\n"
                "PCM; missing parameters default to these, others are refused) or\n"
                "`audio/wav`, possibly chunked, with `model` (then required), `language`\n"
                "and `response_format` as query parameters. The body is read as it\n"
                "arrives; WAV audio of any rate and channel count is converted to the\n"
                "model's 16 kHz mono. Anything but 16-bit PCM is a 400\n"
                "`unsupported_audio_format`, audio over "
                f"{api_types.MAX_TRANSCRIPTION_AUDIO_S} s a 400 `audio_too_long`, a\n"
                "missing `model` a 400 `model_required`, a model that is not a\n"
                "speech-to-text model served here a 404 `model_not_found`. One\n"
                "transcription per model at a time: another waits briefly, else gets a\n"
                "429 `busy` with Retry-After. The worker keeps no audio.\n"
            ),
            "parameters": [
                {
                    "name": "model",
                    "in": "query",
                    "description": "Raw audio: the model (required); multipart: the form's",
                    "schema": {"type": "string", "minLength": 1},
                },
                {
                    "name": "language",
                    "in": "query",
                    "schema": {
                        "type": "string",
                        "pattern": api_types.schema_pattern(api_types.LANGUAGE_PATTERN),
                    },
                },
                {
                    "name": "response_format",
                    "in": "query",
                    "schema": {"type": "string", "enum": list(api_types.TRANSCRIPTION_FORMATS)},
                },
            ],
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": _ref("TranscriptionForm"),
                        "encoding": {"file": {"contentType": "audio/wav"}},
                    },
                    "audio/L16": {"schema": {"type": "string", "format": "binary"}},
                    "audio/wav": {"schema": {"type": "string", "format": "binary"}},
                },
            },
            "responses": _responses(
                {
                    "200": {
                        "description": "The text (`response_format` `text`: as text/plain)",
                        "content": {
                            **_json("Transcription"),
                            "text/plain": {"schema": {"type": "string"}},
                        },
                    }
                },
                "401",
                "404",
                "408",
                "413",
                "429",
            ),
        }
    },
    "/v1/tokens/self": {
        "delete": {
            "operationId": "revokeOwnToken",
            "summary": "Revoke the token this request presents (when a client forgets this worker)",
            "description": (
                "Revokes exactly the bearer token of the request, no other. Home Assistant\n"
                "calls it when a worker's entry is removed.\n"
            ),
            "responses": _responses(
                {"204": {"description": "Revoked; the token is refused from now on"}}, "401"
            ),
        }
    },
    "/v1/openapi.yaml": {
        "get": {
            "operationId": "openapi",
            "security": [],
            "summary": "This document",
            "responses": _responses(
                {
                    "200": {
                        "description": "The OpenAPI document",
                        "content": {"application/yaml": {}},
                    }
                }
            ),
        }
    },
}


def _error(description: str, **extra: Any) -> dict[str, Any]:
    return {"description": description, **extra, "content": _json("Error")}


RESPONSES: dict[str, Any] = {
    "BadRequest": {
        "description": (
            "Malformed or invalid request. Malformed HTTP (e.g. a control byte in a\n"
            "header) is refused before it reaches the API, in plain text.\n"
        ),
        "content": {**_json("Error"), "text/plain": {"schema": {"type": "string"}}},
    },
    "Unauthorized": _error("Missing or unknown bearer token"),
    "Forbidden": _error("Wrong or expired pairing code"),
    "NotFound": _error("Unknown model (or pull job)"),
    "AdminRequired": _error("The token is not an admin token (code `admin_required`)"),
    "Conflict": _error(
        "The model cannot be removed through the API (`model_not_removable`), or the\n"
        "worker has no models directory to pull into (`no_models_dir`)\n"
    ),
    "TooLarge": _error(
        "Request body or prompt too large (or, code `too_many_inputs`, too many\n"
        "embedding inputs)\n"
    ),
    "RequestTimeout": _error(
        "The audio stopped coming before the body ended (code `request_timeout`)"
    ),
    "Unavailable": _error(
        "The voice's process could not be started or ended (code `voice_unavailable`)"
    ),
    "TooManyRequests": _error(
        "Busy (queue full) or too many wrong pairing codes; see Retry-After",
        headers={
            "Retry-After": {
                "description": "Seconds to wait before retrying",
                "schema": {"type": "integer", "minimum": 1},
            }
        },
    ),
}


def _tidy(schema: Any) -> Any:
    """pydantic's JSON schema, as a spec reads best: no titles, no null defaults, and
    an anyOf of plain members of distinct types as one `type` list."""
    if isinstance(schema, list):
        return [_tidy(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {
        key: _tidy(value) if key not in ("default", "const", "enum") else value
        for key, value in schema.items()
        if key != "title"
        and not (key == "default" and value is None)
        and not (key == "additionalProperties" and value is True)
    }
    members = out.get("anyOf")
    if isinstance(members, list) and (merged := _merge(members)) is not None:
        del out["anyOf"]
        out = {**merged, **out}
    for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        value = out.get(key)
        if isinstance(value, float) and value.is_integer():  # 2, as pydantic 2.12 writes it
            out[key] = int(value)
    if "type" in out:  # first, where a reader looks
        out = {"type": out.pop("type"), **out}
    return out


def _merge(members: list[Any]) -> dict[str, Any] | None:
    """One schema for anyOf `members` that are each a plain schema of a distinct type."""
    types: list[str] = []
    merged: dict[str, Any] = {}
    enum: list[Any] | None = None
    for member in members:
        kind = member.get("type") if isinstance(member, dict) else None
        if not isinstance(kind, str) or kind in types:
            return None
        rest = {k: v for k, v in member.items() if k not in ("type", "description")}
        if "const" in rest:  # a Literal's single value
            rest["enum"] = [rest.pop("const")]
        if "enum" in rest:
            if enum is not None:
                return None
            enum = list(rest.pop("enum"))
        if set(rest) - _TYPE_KEYWORDS[kind] or set(rest) & set(merged):
            return None
        types.append(kind)
        merged.update(rest)
    if enum is not None:  # a Literal, or a Literal or null
        if len(types) > 2 or (len(types) == 2 and "null" not in types):
            return None
        if "null" in types:
            enum.append(None)
        merged["enum"] = enum
    return {"type": types[0] if len(types) == 1 else types, **merged}


def schemas() -> dict[str, Any]:
    """components/schemas: every request and answer type, and what they refer to."""
    adapters: list[tuple[str, JsonSchemaMode, TypeAdapter[Any]]] = [
        (t.__name__, "validation", TypeAdapter(t))
        for t in (*api_types.REQUEST_MODELS, *api_types.ANSWER_TYPES)
    ]
    adapters.append(("ModelId", "validation", TypeAdapter(api_types.ModelId)))
    tops, defs = TypeAdapter.json_schemas(adapters, ref_template=_REF)
    found = dict(defs.get("$defs", {}))
    for (name, _mode), schema in tops.items():
        if schema != _ref(name):
            found[name] = schema
    return {name: _tidy(found[name]) for name in sorted(found)}


def build() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "Hearth worker API", "version": "1", "description": DESCRIPTION},
        "servers": [{"url": "https://127.0.0.1:8765"}],
        "security": [{"bearer": []}],
        "paths": PATHS,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "responses": RESPONSES,
            "schemas": schemas(),
        },
    }


class _Dumper(yaml.SafeDumper):
    """Multi-line text as YAML block scalars; short leaves on one line."""


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


def _leaf(value: dict[str, Any] | list[Any]) -> bool:
    """A mapping or list of short scalars, written on one line."""
    items = value.values() if isinstance(value, dict) else value
    return (
        all(
            not isinstance(item, dict | list) and len(str(item)) <= 40 and "\n" not in str(item)
            for item in items
        )
        and len(str(value)) <= 80
    )


def _mapping(dumper: yaml.SafeDumper, value: dict[str, Any]) -> yaml.MappingNode:
    return dumper.represent_mapping("tag:yaml.org,2002:map", value, flow_style=_leaf(value))


def _sequence(dumper: yaml.SafeDumper, value: list[Any]) -> yaml.SequenceNode:
    return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=_leaf(value))


_Dumper.add_representer(str, _text)
_Dumper.add_representer(dict, _mapping)
_Dumper.add_representer(list, _sequence)


def render() -> str:
    """openapi.yaml's text."""
    body = yaml.dump(build(), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)
    return "# Generated by scripts/openapi from hearth_worker/api_types.py: do not edit.\n" + body


def committed() -> str:
    return resources.files("hearth_worker").joinpath(SPEC_FILE).read_text("utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="write openapi.yaml")
    parser.add_argument("--check", action="store_true", help="exit 1 if openapi.yaml differs")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        Path(str(resources.files("hearth_worker").joinpath(SPEC_FILE))).write_text(text, "utf-8")
    elif args.check:
        if committed() != text:
            print(f"{SPEC_FILE} is not current: run scripts/openapi", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
