"""The worker's API types, declared once: request bodies and answers, as pydantic models.

`validation.py` validates request bodies with the request models; `openapi.py`
derives openapi.yaml's schemas from all of them (`scripts/openapi` writes the file,
tests/worker/test_openapi.py checks it is current). A limit is stated here once:
as a field's constraint (in the schema and checked) or, where JSON Schema cannot
say it (sizes as JSON, named tools), as a validator with the error code the API
answers, its limit given in the schema's description.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, NotRequired

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from typing_extensions import TypedDict  # pydantic's choice before Python 3.12

from .pairing import MAX_NONCE_BYTES, MIN_NONCE_BYTES, SALT_BYTES

MAX_STOP_SEQUENCES = 4
MAX_EMBEDDING_INPUTS = 256
# One tool's function definition, and all of a request's tools, as compact JSON.
MAX_TOOL_BYTES = 32 * 1024
MAX_TOOLS_BYTES = 256 * 1024
# The API accepts OpenAI's 64-bit seeds; the engine takes 31 bits (`engine_seed`).
SEED_MIN = -(2**63)
SEED_MAX = 2**63 - 1
# max_tokens / max_completion_tokens: at most a 32-bit count (a context is far smaller).
MAX_TOKENS_LIMIT = 2**31 - 1
MAX_SOURCE_CHARS = 300
# Speech (POST /v1/audio/speech): OpenAI's input limit; the sample rates the worker
# resamples to; OpenAI's speeds.
MAX_SPEECH_INPUT_CHARS = 4096
SPEECH_FORMATS = ("wav", "pcm")
MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 48000
MIN_SPEED = 0.25
MAX_SPEED = 4.0
# Speech to text (POST /v1/audio/transcriptions): the longest audio taken, the WAV
# rates taken (converted to the model's 16 kHz), the answer's formats, and a language
# (ISO 639-1, or a tag such as en-US, taken as its first part).
MAX_TRANSCRIPTION_AUDIO_S = 30
MIN_TRANSCRIPTION_RATE = 8000
MAX_TRANSCRIPTION_RATE = 192000
TRANSCRIPTION_FORMATS = ("json", "text")
LANGUAGE_PATTERN = re.compile(r"[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{1,8})*")
# Text to speak has a character that is not white space (Python's `re`, as the
# validator below and the fuzzer's checks of the spec both read it).
_SPOKEN = re.compile(r"\S")
MAX_MODEL_NAME_CHARS = 100
# A pull's source: owner/name, then optionally ":" and a folder path of plain
# segments (never "." or "..").
_SEGMENT = r"[A-Za-z0-9._+=@-]+"
SOURCE_PATTERN = re.compile(
    rf"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(?::{_SEGMENT}(?:/{_SEGMENT})*)?"
)
_DOT_SEGMENT = re.compile(r":(?:.*/)?\.{1,2}(?:/|$)")
# A model's id is part of the worker's URLs (/v1/models/ID) and what Home Assistant
# shows: no slash, no control character, no white space at either end.
_NAME_CHAR = r"[^/\\\x00-\x1f\x7f-\x9f]"
_NAME_EDGE = r"[^\s/\\\x00-\x1f\x7f-\x9f]"
MODEL_NAME_PATTERN = re.compile(rf"{_NAME_EDGE}(?:{_NAME_CHAR}*{_NAME_EDGE})?")

# Custom validation errors: their type is the `code` the API answers, with this status.
ERROR_STATUS = {
    "tool_too_large": 400,
    "tools_too_large": 400,
    "schema_too_large": 400,
    "too_many_inputs": 413,
    "unsupported_response_format": 400,
    "model_required": 400,
}
INVALID = "invalid_request"


def json_size(value: Any) -> int:
    """Bytes of `value` as JSON (UTF-8, not ASCII-escaped): what the size limits count."""
    return len(json.dumps(value, ensure_ascii=False).encode())


def schema_pattern(pattern: re.Pattern[str]) -> str:
    """A Python full-match pattern as a JSON Schema `pattern` (anchored; same syntax)."""
    return f"^(?:{pattern.pattern})$"


class _Model(BaseModel):
    """Requests: JSON types as they are (no "1" for 1, no 1 for true); unknown keys ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")


def _invalid(message: str) -> PydanticCustomError:
    return PydanticCustomError(INVALID, message)


# -- chat -------------------------------------------------------------------------

NonEmpty = Annotated[str, Field(min_length=1)]
TokenCount = Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)]


class TextPart(_Model):
    type: Literal["text"]
    text: str

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("type") != "text":
            raise _invalid("Only text content parts are supported")
        return data


class ToolCallFunctionInput(_Model):
    name: str
    arguments: Annotated[
        str | dict[str, Any],
        Field(description="JSON-encoded arguments (an object is encoded by the worker)"),
    ] = "{}"

    @model_validator(mode="before")
    @classmethod
    def _named(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            raise _invalid("A tool call needs 'function' with a string 'name'")
        return data


class ToolCallInput(_Model):
    """A tool call in a request's history (a ToolCall, with defaults)"""

    id: str = ""
    type: Literal["function"] = "function"
    function: ToolCallFunctionInput


class ChatMessage(_Model):
    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [  # only assistant messages carry tool calls
                {"properties": {"role": {"const": "assistant"}}},
                {"properties": {"tool_calls": {"type": "null"}}},
            ]
        }
    )

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[
        str | list[TextPart] | None, Field(description="A string, null, or text parts")
    ] = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: Annotated[
        list[ToolCallInput] | None, Field(description="On assistant messages only")
    ] = None

    @model_validator(mode="after")
    def _calls_on_assistant(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise _invalid("'tool_calls' must be an array on an assistant message")
        return self


class ToolFunction(_Model):
    name: str
    description: str | None = None
    parameters: Annotated[dict[str, Any], Field(description="A JSON schema")] = Field(
        default_factory=lambda: {"type": "object", "properties": {}}
    )

    @model_validator(mode="before")
    @classmethod
    def _named(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            raise _invalid("A tool needs 'function' with a string 'name'")
        return data

    def entry(self) -> dict[str, Any]:
        """The function as the engine takes it (and as its size is counted)."""
        entry: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description:
            entry["description"] = self.description
        return entry


class Tool(_Model):
    __doc__ = (
        f"At most {MAX_TOOL_BYTES // 1024} KiB as JSON; all of a request's tools at most "
        f"{MAX_TOOLS_BYTES // 1024} KiB"
    )

    type: Literal["function"] = "function"
    function: ToolFunction


class StreamOptions(_Model):
    include_usage: bool | None = None


class FunctionName(_Model):
    name: str


class ToolChoiceFunction(_Model):
    type: Literal["function"]
    function: FunctionName


class ResponseFormatText(_Model):
    type: Literal["text", "json_object"]


class JsonSchemaFormat(_Model):
    name: str = "response"
    description: str | None = None
    schema_: Annotated[dict[str, Any], Field(alias="schema", description="A JSON schema")] = Field(
        default_factory=dict, alias="schema"
    )
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _size(cls, schema: dict[str, Any]) -> dict[str, Any]:
        size = json_size(schema)
        if size > MAX_TOOL_BYTES:
            raise PydanticCustomError(
                "schema_too_large",
                "The response schema is too large: {size} bytes as JSON (at most {limit})",
                {"size": size, "limit": MAX_TOOL_BYTES},
            )
        return schema


class ResponseFormatJsonSchema(_Model):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


class ChatCompletionRequest(_Model):
    model: NonEmpty
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: TokenCount | None = None
    max_completion_tokens: TokenCount | None = None
    temperature: Annotated[
        float | None,
        Field(
            ge=0,
            le=2,
            description="0 is greedy; unset, the model's default (ModelInfo.sampling_defaults)",
        ),
    ] = None
    top_p: Annotated[float | None, Field(gt=0, le=1)] = None
    top_k: Annotated[int | None, Field(ge=0, le=MAX_TOKENS_LIMIT, description="0: no cut")] = None
    repetition_penalty: Annotated[
        float | None,
        Field(
            gt=0,
            le=2,
            description="1 for none; unset, the model's default (ModelInfo.sampling_defaults)",
        ),
    ] = None
    response_format: Annotated[
        ResponseFormatText | ResponseFormatJsonSchema | None,
        Field(
            description="text (the default), any JSON object, or JSON valid against a "
            "schema. Decoded under a grammar where the model supports it "
            f"(ModelInfo.guidance). The schema: at most {MAX_TOOL_BYTES // 1024} KiB as JSON."
        ),
    ] = None
    stop: Annotated[
        NonEmpty | Annotated[list[NonEmpty], Field(max_length=MAX_STOP_SEQUENCES)] | None,
        Field(description=f"A string or up to {MAX_STOP_SEQUENCES} of them, none empty"),
    ] = None
    seed: Annotated[
        int | None,
        Field(
            ge=SEED_MIN,
            le=SEED_MAX,
            description="A 64-bit integer; the same seed draws the same answer",
        ),
    ] = None
    n: Annotated[int | None, Field(ge=1, le=1, description="Only 1")] = None
    tools: list[Tool] | None = None
    tool_choice: Annotated[
        Literal["none", "auto", "required"] | ToolChoiceFunction | None,
        Field(
            description='"none", "auto" or "required", or a named function (one of '
            "`tools`; else a 400). Where the model supports guidance (ModelInfo.guidance), "
            '"required" and a named function force a call, and every call parses and '
            "validates against its tool's parameters."
        ),
    ] = None

    @field_validator("tools")
    @classmethod
    def _tools_size(cls, tools: list[Tool] | None) -> list[Tool] | None:
        total = 0
        for i, tool in enumerate(tools or []):
            size = json_size(tool.function.entry())
            if size > MAX_TOOL_BYTES:
                raise PydanticCustomError(
                    "tool_too_large",
                    "Tool {name} is too large: {size} bytes as JSON (at most {limit})",
                    {
                        "name": repr(tool.function.name[:40]),
                        "size": size,
                        "limit": MAX_TOOL_BYTES,
                        "param": f"tools[{i}].function",
                    },
                )
            total += size
            if total > MAX_TOOLS_BYTES:
                raise PydanticCustomError(
                    "tools_too_large",
                    "The tools are too large together: more than {limit} bytes as JSON",
                    {"limit": MAX_TOOLS_BYTES},
                )
        return tools


# -- embeddings --------------------------------------------------------------------


def _at_most_inputs(value: str | list[str]) -> str | list[str]:
    if isinstance(value, list) and len(value) > MAX_EMBEDDING_INPUTS:
        raise PydanticCustomError(
            "too_many_inputs",
            "At most {limit} inputs per request",
            {"limit": MAX_EMBEDDING_INPUTS},
        )
    return value


class EmbeddingRequest(_Model):
    model: NonEmpty
    input: Annotated[
        str | Annotated[list[str], Field(min_length=1)],
        Field(
            description=f"A string, or 1 to {MAX_EMBEDDING_INPUTS} of them",
            json_schema_extra={"maxItems": MAX_EMBEDDING_INPUTS},
        ),
    ]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: Annotated[
        None, Field(description="Not supported (the model's own size is used)")
    ] = None

    @field_validator("input")
    @classmethod
    def _count(cls, value: str | list[str]) -> str | list[str]:
        return _at_most_inputs(value)

    @field_validator("dimensions", mode="before")
    @classmethod
    def _no_dimensions(cls, value: Any) -> None:
        if value is not None:
            raise _invalid("'dimensions' is not supported by this worker")


# -- pairing -------------------------------------------------------------------------


def _no_code(schema: dict[str, Any]) -> None:
    schema["properties"]["code"] = {
        "not": {},
        "description": "Never sent - the pairing code stays on the client",
    }


class PairRequest(_Model):
    """At most 4 KiB of JSON (no token is needed to send it)."""

    model_config = ConfigDict(json_schema_extra=_no_code)

    salt: Annotated[
        str,
        Field(pattern=f"^[0-9a-fA-F]{{{2 * SALT_BYTES}}}$", description="From GET /v1/pair"),
    ]
    client_nonce: Annotated[
        str, Field(pattern=f"^([0-9a-fA-F]{{2}}){{{MIN_NONCE_BYTES},{MAX_NONCE_BYTES}}}$")
    ]
    proof: Annotated[str, Field(pattern="^[0-9a-fA-F]{64}$")]
    client_name: Annotated[
        str | None, Field(max_length=100, description="Shown when tokens are listed")
    ] = None


# -- models (POST /v1/models/pull) -----------------------------------------------------

ModelId = Annotated[
    str,
    Field(
        max_length=MAX_MODEL_NAME_CHARS,
        description="A model's id (its name); what a pull's `name` may be",
        json_schema_extra={"pattern": schema_pattern(MODEL_NAME_PATTERN)},
    ),
]


class PullRequest(_Model):
    """At most 4 KiB of JSON."""

    source: Annotated[
        str,
        Field(
            max_length=MAX_SOURCE_CHARS,
            description="A Hugging Face repository id, optionally with a folder in it: "
            "`owner/name` or `owner/name:sub/folder` (no `.` or `..` folders), holding an "
            "onnxruntime-genai model (genai_config.json) or an ONNX embedding model",
            json_schema_extra={
                "pattern": schema_pattern(SOURCE_PATTERN),
                "not": {"pattern": _DOT_SEGMENT.pattern},
            },
        ),
    ]
    name: Annotated[
        str | None,
        Field(
            max_length=MAX_MODEL_NAME_CHARS,
            description="The model's id and the name Home Assistant shows (default: from "
            "the repository); no slash or control characters, no white space at either end",
            json_schema_extra={"pattern": schema_pattern(MODEL_NAME_PATTERN)},
        ),
    ] = None

    @field_validator("source", mode="before")
    @classmethod
    def _source(cls, source: Any) -> Any:
        if isinstance(source, str) and (
            len(source) > MAX_SOURCE_CHARS
            or not SOURCE_PATTERN.fullmatch(source)
            or _DOT_SEGMENT.search(source)
        ):
            raise _invalid(
                "'source' must be a Hugging Face model id, owner/name or "
                f"owner/name:sub/folder (at most {MAX_SOURCE_CHARS} characters)"
            )
        return source

    @field_validator("name", mode="before")
    @classmethod
    def _name(cls, name: Any) -> Any:
        if isinstance(name, str) and (
            len(name) > MAX_MODEL_NAME_CHARS or not MODEL_NAME_PATTERN.fullmatch(name)
        ):
            raise _invalid(
                f"'name' must be 1 to {MAX_MODEL_NAME_CHARS} characters, without a slash or "
                "control characters, not starting or ending with white space"
            )
        return name


# -- speech (POST /v1/audio/speech) ---------------------------------------------------


class SpeechRequest(_Model):
    """OpenAI's `audio.speech.create` body, with Hearth's `sample_rate`."""

    model: Annotated[str, Field(min_length=1, description="A speech model (a voice) served here")]
    input: Annotated[
        str,
        Field(
            min_length=1,
            max_length=MAX_SPEECH_INPUT_CHARS,
            description="The text to speak (not only white space)",
            json_schema_extra={"pattern": _SPOKEN.pattern},
        ),
    ]
    voice: Annotated[
        str | None,
        Field(description="The model's speaker (its `hearth.voices`) or the model's id"),
    ] = None
    response_format: Annotated[
        Literal["wav", "pcm"] | None,
        Field(
            description="`wav` (default): a WAV header of unknown (streaming) length, then "
            "16-bit mono PCM; `pcm`: the PCM only. Others: 400 `unsupported_response_format`"
        ),
    ] = None
    speed: Annotated[float | None, Field(ge=MIN_SPEED, le=MAX_SPEED)] = None
    sample_rate: Annotated[
        int | None,
        Field(
            ge=MIN_SAMPLE_RATE,
            le=MAX_SAMPLE_RATE,
            description="Hz (default: the voice's own rate); the worker resamples",
        ),
    ] = None
    stream_format: Annotated[
        Literal["audio"] | None, Field(description="The audio is always streamed")
    ] = None

    @field_validator("model", mode="before")
    @classmethod
    def _model(cls, value: Any) -> Any:
        if not isinstance(value, str) or not value:
            raise _invalid("'model' must name a speech model served here")
        return value

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, value: Any) -> Any:
        if not isinstance(value, str) or not _SPOKEN.search(value):
            raise _invalid("'input' must be the text to speak")
        if len(value) > MAX_SPEECH_INPUT_CHARS:
            raise _invalid(f"'input' is too long (at most {MAX_SPEECH_INPUT_CHARS} characters)")
        return value

    @field_validator("voice", mode="before")
    @classmethod
    def _voice(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, str):
            raise _invalid("'voice' must be a string")
        return value

    @field_validator("response_format", mode="before")
    @classmethod
    def _format(cls, value: Any) -> Any:
        if value is not None and value not in SPEECH_FORMATS:
            raise PydanticCustomError(
                "unsupported_response_format",
                "'response_format' {value} is not supported here: use 'wav' or 'pcm' (16-bit mono)",
                {"value": repr(value)},
            )
        return value

    @field_validator("speed", mode="before")
    @classmethod
    def _speed(cls, value: Any) -> Any:
        if value is not None and (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not MIN_SPEED <= value <= MAX_SPEED
        ):
            raise _invalid(f"'speed' must be from {MIN_SPEED} to {MAX_SPEED}")
        return value

    @field_validator("sample_rate", mode="before")
    @classmethod
    def _rate(cls, value: Any) -> Any:
        if value is not None and (
            isinstance(value, bool)
            or not isinstance(value, int)
            or not MIN_SAMPLE_RATE <= value <= MAX_SAMPLE_RATE
        ):
            raise _invalid(
                f"'sample_rate' must be a whole number of Hz from {MIN_SAMPLE_RATE} to "
                f"{MAX_SAMPLE_RATE}"
            )
        return value

    @field_validator("stream_format", mode="before")
    @classmethod
    def _stream(cls, value: Any) -> Any:
        if value not in (None, "audio"):
            raise _invalid("'stream_format' must be 'audio' (the audio is always streamed)")
        return value


# -- speech to text (POST /v1/audio/transcriptions) ----------------------------------


class TranscriptionRequest(_Model):
    """The parameters of POST /v1/audio/transcriptions: form fields (OpenAI's
    multipart form) or query parameters (a raw audio body)."""

    model: Annotated[
        str,
        Field(min_length=1, description="A speech-to-text model served here (`kind` `stt`)"),
    ]
    language: Annotated[
        str | None,
        Field(
            pattern=schema_pattern(LANGUAGE_PATTERN),
            description="ISO 639-1 (`en`; `en-US` is taken as `en`), one of the model's "
            "`languages`, else 400 `unsupported_language`; none: the model finds out",
        ),
    ] = None
    response_format: Annotated[
        Literal["json", "text"] | None,
        Field(
            description='`json` (default): `{"text": ...}`; `text`: the text as text/plain. '
            "Others: 400 `unsupported_response_format`"
        ),
    ] = None

    @field_validator("model", mode="before")
    @classmethod
    def _model(cls, value: Any) -> Any:
        if not isinstance(value, str) or not value:
            raise PydanticCustomError(
                "model_required", "'model' must name a speech-to-text model served here"
            )
        return value

    @field_validator("language", mode="before")
    @classmethod
    def _language(cls, value: Any) -> Any:
        if value is not None and not (isinstance(value, str) and LANGUAGE_PATTERN.fullmatch(value)):
            raise _invalid("'language' must be a language code such as 'en'")
        return value

    @field_validator("response_format", mode="before")
    @classmethod
    def _format(cls, value: Any) -> Any:
        if value is not None and value not in TRANSCRIPTION_FORMATS:
            raise PydanticCustomError(
                "unsupported_response_format",
                "'response_format' {value} is not supported here: use 'json' or 'text'",
                {"value": repr(value)},
            )
        return value


TRANSCRIPTION_PARAMS = tuple(TranscriptionRequest.model_fields)


class TranscriptionForm(TranscriptionRequest):
    """OpenAI's `audio.transcriptions.create` form (multipart/form-data)."""

    file: Annotated[
        bytes,
        Field(
            description="A WAV file: 16-bit PCM, mono or up to 8 channels, "
            f"{MIN_TRANSCRIPTION_RATE}-{MAX_TRANSCRIPTION_RATE} Hz (converted to the "
            f"model's 16 kHz mono), at most {MAX_TRANSCRIPTION_AUDIO_S} s"
        ),
    ]
    prompt: Annotated[str | None, Field(description="Accepted and ignored")] = None
    temperature: Annotated[float | None, Field(description="Accepted and ignored")] = None


REQUEST_MODELS: tuple[type[BaseModel], ...] = (
    ChatCompletionRequest,
    EmbeddingRequest,
    PairRequest,
    PullRequest,
    SpeechRequest,
    TranscriptionForm,
)


# -- answers ---------------------------------------------------------------------------
# TypedDicts: what the server writes is a JSON object; these say which keys it has
# (NotRequired: a key that may be absent).


class ErrorDetail(TypedDict):
    message: str
    type: Literal[
        "invalid_request_error",
        "authentication_error",
        "permission_error",
        "not_found_error",
        "rate_limit_error",
        "server_error",
    ]
    code: str
    param: NotRequired[str | None]


class Error(TypedDict):
    error: ErrorDetail


class Health(TypedDict):
    status: Literal["ok"]
    version: str
    api_version: int


class Kdf(TypedDict, total=False):
    name: Literal["scrypt"]
    n: int
    r: int
    p: int


class PairChallenge(TypedDict):
    protocol: Literal["hearth-pair-v1"]
    salt: Annotated[str, Field(pattern="^[0-9a-f]{32}$")]
    kdf: Kdf
    tls: Annotated[
        bool, Field(description="Whether the proof is bound to a certificate fingerprint")
    ]


class PairResponse(TypedDict):
    token: str
    token_id: str
    node_id: str
    proof: Annotated[str, Field(pattern="^[0-9a-f]{64}$", description="The worker's proof")]


class SamplingDefaults(TypedDict):
    """Chat models: the sampling used where a request sets none, from the model's
    generation_config.json (or genai_config.json); temperature 0 is greedy.
    Repetition control is Hearth's where the model says nothing of it."""

    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    no_repeat_ngram_size: int
    source: NotRequired[str]
    repetition_source: NotRequired[str]


class ModelInfo(TypedDict):
    id: str
    kind: Literal["chat", "embedding", "stt"]
    quantization: str
    context_length: int
    size_bytes: int
    dimensions: NotRequired[
        Annotated[int | None, Field(description="Embedding size, for embedding models")]
    ]
    guidance: NotRequired[
        Annotated[
            bool,
            Field(
                description="Chat models: whether answers can be decoded under a grammar "
                "(tool calls that always parse, response_format). false: tool calls are "
                "parsed as the model writes them, and response_format is not enforced."
            ),
        ]
    ]
    tool_call_format: NotRequired[
        Annotated[
            Literal["hermes", "mistral", "llama3"] | None,
            Field(
                description="Chat models: the tool-call syntax guided calls are written in "
                "(null: none)"
            ),
        ]
    ]
    sampling_defaults: NotRequired[SamplingDefaults]


class VoiceInfo(TypedDict):
    """A speech model (a Piper voice) in /v1/models, for POST /v1/audio/speech."""

    id: str
    kind: Literal["tts"]
    runtime: Literal["piper"]
    languages: list[str]
    voice: Annotated[str, Field(description="The speaker")]
    voices: list[str]
    quality: str | None
    sample_rate: Annotated[int, Field(description="The voice's own rate, Hz")]
    sample_rates: Annotated[
        list[int], Field(description="The lowest and highest rate it can answer at, Hz")
    ]
    response_formats: list[Literal["wav", "pcm"]]
    size_bytes: int


class SttInfo(TypedDict):
    """A speech-to-text model in /v1/models, for POST /v1/audio/transcriptions."""

    id: str
    kind: Literal["stt"]
    languages: Annotated[list[str], Field(description="ISO 639-1 codes")]
    sample_rate: Annotated[int, Field(description="The model's rate, Hz (16000)")]
    runtime: str
    quantization: str
    size_bytes: int
    max_audio_s: Annotated[int, Field(description="The longest audio taken, seconds")]


class Hardware(TypedDict):
    cpu_count: int
    memory_total_mb: int
    platform: str
    machine: str
    cpu_model: NotRequired[str | None]


PullStatus = Literal["running", "done", "failed", "cancelled"]
Bytes = Annotated[int, Field(ge=0)]


class JobError(TypedDict):
    code: str
    message: str


class PullSummary(TypedDict):
    source: Annotated[str, Field(description="owner/name[:sub/folder]")]
    status: PullStatus
    phase: Annotated[str, Field(description="As in PullJob")]
    done_bytes: Bytes
    total_bytes: Annotated[int, Field(ge=0, description="0 until known")]
    error: Annotated[
        JobError | None,
        Field(
            description="Why it failed or was cancelled (codes as in PullJob; no_space when "
            "the disk is too small)"
        ),
    ]


class Info(TypedDict):
    node_id: str
    name: str
    version: str
    api_version: int
    hardware: Hardware
    execution_providers: list[str]
    models: list[ModelInfo]
    pulls: Annotated[
        list[PullSummary],
        Field(
            description="The pull jobs this worker keeps (in memory; oldest first): those "
            "started at start-up (`serve --pull`, the add-on's hub ids) and through POST "
            "/v1/models/pull. For any token: no job id, and the models folder's path reads "
            '"the models folder" in messages. A source pulled again shows its latest job last.'
        ),
    ]


class ModelRates(TypedDict):
    prefill_tok_s: float | None
    decode_tok_s: float | None
    requests_served: int
    batch_peak_bytes: NotRequired[
        Annotated[
            int,
            Field(
                ge=0,
                description="Chat models: the largest KV buffer the shared decode batch has "
                "held (requests decoding together), 0 until two decoded at once",
            ),
        ]
    ]


class SttCosts(TypedDict):
    """A speech-to-text model's measured costs (null until measured): the time from the
    end of the audio to its text is about stt_fixed_ms + stt_ms_per_audio_s x seconds."""

    kind: Literal["stt"]
    stt_fixed_ms: float | None
    stt_ms_per_audio_s: float | None
    requests_served: int
    loaded: NotRequired[
        Annotated[bool, Field(description="In memory and warm (its next job starts at once)")]
    ]


class TtsCosts(TypedDict):
    """A voice's measured costs (null until measured)."""

    kind: Literal["tts"]
    tts_first_audio_ms: Annotated[
        float | None, Field(description="From the request to the first audio")
    ]
    tts_rtf: Annotated[float | None, Field(description="Seconds of synthesis per second of audio")]
    requests_served: int
    loaded: NotRequired[Annotated[bool, Field(description="Its Piper process is running (warm)")]]


class WarmPrefix(TypedDict):
    tokens: Annotated[int, Field(ge=1)]
    sha256: str


class PromptCacheStats(TypedDict):
    """The prompt cache (KV caches of recent prompts, in memory only)"""

    budget_bytes: Annotated[
        int, Field(ge=0, description="Bounds the generators kept and those running together")
    ]
    used_bytes: Annotated[int, Field(ge=0, description="Held by idle cached generators")]
    in_use_bytes: Annotated[int, Field(ge=0, description="Held by the generators running now")]
    peak_bytes: Bytes
    entries: Bytes
    hits: NotRequired[Bytes]
    misses: NotRequired[Bytes]
    evictions: NotRequired[Bytes]
    cached_tokens: NotRequired[
        Annotated[
            int,
            Field(ge=0, description="Prompt tokens not prefilled thanks to the cache, in all"),
        ]
    ]
    prefix_blocks: NotRequired[list[int]]
    warm_prefixes: Annotated[
        dict[str, list[WarmPrefix]],
        Field(
            description="Per model id, the cached prompt prefixes as SHA-256 (first 16 bytes, "
            "hex) of their first N token ids (4-byte little-endian each), never text"
        ),
    ]
    warm_keys: NotRequired[
        Annotated[
            dict[str, list[str]],
            Field(
                description="Per model id, the X-Hearth-Prefix keys of the requests whose "
                "prompts the cache holds, most recently used first (hashes sent by clients, "
                "never text)"
            ),
        ]
    ]


class Capacity(TypedDict):
    node_id: str
    running: Bytes
    queued: Bytes
    max_running: Annotated[int, Field(ge=1)]
    max_queued: Bytes
    models: Annotated[
        dict[str, ModelRates | SttCosts | TtsCosts],
        Field(
            description="Per model id: measured rates (chat and embedding models), or "
            "costs (speech models: learned from requests and the self-check at start)"
        ),
    ]
    memory_free_mb: int
    memory_total_mb: int
    cpu_percent: float
    on_battery: Annotated[bool | None, Field(description="null where the OS does not tell")]
    battery_percent: float | None
    user_active: Annotated[
        bool | None,
        Field(description="Whether someone is using the machine; null where the OS does not tell"),
    ]
    timestamp: Annotated[float, Field(description="Unix time of the snapshot")]
    prompt_cache: NotRequired[
        Annotated[PromptCacheStats | None, Field(description="null when turned off")]
    ]


class Model(TypedDict):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    kind: NotRequired[Annotated[Literal["stt"], Field(description="Speech-to-text models")]]
    languages: NotRequired[list[str]]
    sample_rate: NotRequired[int]
    hearth: NotRequired[ModelInfo | VoiceInfo | SttInfo]


class ModelList(TypedDict):
    object: Literal["list"]
    data: list[Model]


class ModelDeleted(TypedDict):
    id: str
    deleted: Literal[True]


class PullJob(TypedDict):
    id: Annotated[str, Field(pattern="^pull_")]
    source: Annotated[str, Field(description="The source, normalized (owner/name[:sub/folder])")]
    status: PullStatus
    phase: Annotated[
        str,
        Field(
            description="queued (waiting for a free download thread), resolving, downloading, "
            "verifying, installing, loading (the worker loads and warms up the model), done; "
            "a job that failed or was cancelled keeps the phase it stopped in"
        ),
    ]
    done_bytes: Bytes
    total_bytes: Annotated[int, Field(ge=0, description="0 until known")]
    model: Annotated[Model | None, Field(description="The model now served, once done")]
    error: Annotated[
        JobError | None,
        Field(
            description="Why the job failed or was cancelled. Codes: unknown_repo, "
            "unknown_subfolder, not_a_model, no_space, network, corrupt, cancelled, "
            "name_taken (a model of that name exists: pull with another name), load_failed "
            "(downloaded, but it could not be loaded: deleted again), internal_error"
        ),
    ]


class Machine(TypedDict):
    """What the entries were measured against"""

    memory_total_bytes: int
    memory_available_bytes: int
    cores: int
    free_disk_bytes: Annotated[int, Field(description="Where models are kept")]


class CatalogEntry(TypedDict):
    id: str
    name: str
    source: Annotated[str, Field(description="For POST /v1/models/pull")]
    kind: Annotated[
        Literal["chat", "embedding", "tts"],
        Field(description="tts: a Piper voice (context_length 0; listed, never recommended)"),
    ]
    parameters_b: Annotated[float, Field(description="Billions of parameters")]
    disk_bytes: int
    memory_bytes: Annotated[int, Field(description="Memory it needs to serve (approximate)")]
    context_length: int
    license: str
    tool_calling: bool
    checked: Annotated[str, Field(description="Where and when the entry was checked")]
    fits: Annotated[bool, Field(description="Fits both the available memory and the free disk")]
    fits_memory: bool
    fits_disk: bool
    recommended: bool
    reason: str
    installed: bool


class Catalog(TypedDict):
    object: Literal["list"]
    data: list[CatalogEntry]
    machine: Machine


class FunctionCall(TypedDict):
    name: str
    arguments: Annotated[str, Field(description="JSON-encoded arguments")]


class ToolCall(TypedDict):
    id: str
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(TypedDict):
    role: Literal["assistant"]
    content: str | None
    tool_calls: NotRequired[list[ToolCall]]


FinishReason = Literal["stop", "length", "tool_calls"]


class Choice(TypedDict):
    index: int
    finish_reason: FinishReason
    message: AssistantMessage


class PromptTokensDetails(TypedDict, total=False):
    cached_tokens: Annotated[
        int, Field(ge=0, description="Prompt tokens taken from the prompt cache (not prefilled)")
    ]


class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: NotRequired[PromptTokensDetails]


class ChatCompletion(TypedDict):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ChunkFunction(TypedDict, total=False):
    name: str
    arguments: str


class ChunkToolCall(TypedDict):
    index: int
    id: NotRequired[str]
    type: NotRequired[str]
    function: NotRequired[ChunkFunction]


class ChunkDelta(TypedDict, total=False):
    role: str
    content: str | None
    tool_calls: list[ChunkToolCall]


class ChunkChoice(TypedDict):
    index: int
    finish_reason: FinishReason | None
    delta: ChunkDelta


class ChatCompletionChunk(TypedDict):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: NotRequired[Usage | None]


class Embedding(TypedDict):
    object: Literal["embedding"]
    index: int
    embedding: Annotated[
        list[float] | str,
        Field(
            description="The numbers, or (encoding_format base64) base64 of little-endian float32"
        ),
    ]


class EmbeddingUsage(TypedDict):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(TypedDict):
    object: Literal["list"]
    model: str
    data: list[Embedding]
    usage: EmbeddingUsage


class Transcription(TypedDict):
    text: str


# The answers openapi.yaml's operations name (their parts come along as $refs).
ANSWER_TYPES: tuple[type[Any], ...] = (
    Error,
    Health,
    PairChallenge,
    PairResponse,
    Info,
    Capacity,
    ModelList,
    ModelDeleted,
    PullJob,
    Catalog,
    ChatCompletion,
    ChatCompletionChunk,
    EmbeddingList,
    Transcription,
)
