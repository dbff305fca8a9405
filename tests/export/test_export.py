"""The export pipeline: scripts/export_model and scripts/make_test_model.

The models come from tests/model_fixtures.py (built once, cached under .cache/);
they are checked here with the worker's own runtimes (onnxruntime-genai,
onnxruntime, tokenizers) in this environment, which has no torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import model_fixtures
import numpy as np
import onnxruntime as ort
import onnxruntime_genai as og
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

REPO = model_fixtures.REPO
EXPORT_MODEL = REPO / "scripts" / "export_model"
EXPORT_PYTHON = REPO / ".venv-export" / "bin" / "python"
CHECK_GRAPH = REPO / "scripts" / "export" / "check_graph.py"


def manifest_of(folder: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((folder / "hearth-model.json").read_text())
    return data


def graph_report(folder: Path) -> dict[str, Any]:
    out = subprocess.run(
        [str(EXPORT_PYTHON), str(CHECK_GRAPH), str(folder)],
        capture_output=True,
        text=True,
        check=True,
    )
    data: dict[str, Any] = json.loads(out.stdout)
    return data


def export_model(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("VIRTUAL_ENV", None)
    return subprocess.run(
        [str(EXPORT_MODEL), *args], capture_output=True, text=True, env=env, check=False
    )


def make_tiny(out: Path, *, hf_dir: Path) -> None:
    """The tiny model exported to `out`, its Hugging Face folder kept in `hf_dir`."""
    made = subprocess.run(
        [str(REPO / "scripts" / "make_test_model"), str(out), "--hf-dir", str(hf_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert made.returncode == 0, made.stderr


def greedy(folder: Path, prompt: str, max_new: int) -> list[int]:
    model = og.Model(str(folder))
    tokenizer = og.Tokenizer(model)
    ids = list(tokenizer.encode(prompt))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + max_new, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    new: list[int] = []
    while not generator.is_done():
        generator.generate_next_token()
        new.append(int(generator.get_next_tokens()[0]))
    return new


def render(folder: Path, messages: list[dict[str, Any]], **extra: Any) -> str:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda value, indent=None: json.dumps(
        value, ensure_ascii=False, indent=indent
    )
    template = env.from_string((folder / "chat_template.jinja").read_text())
    return template.render(messages=messages, add_generation_prompt=True, **extra)


# ---------------------------------------------------------------------------- manifests


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["tiny_chat_model", "embedding_model"])
def test_manifest_lists_every_file(fixture: str, request: pytest.FixtureRequest) -> None:
    folder: Path = request.getfixturevalue(fixture)
    manifest = manifest_of(folder)
    on_disk = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.name != "hearth-model.json"
    )
    assert [f["path"] for f in manifest["files"]] == on_disk
    for entry in manifest["files"]:
        data = (folder / entry["path"]).read_bytes()
        assert entry["size_bytes"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["size_bytes"] == sum(f["size_bytes"] for f in manifest["files"])
    assert manifest["format_version"] == 1
    assert manifest["created_at"].endswith("Z")


@pytest.mark.slow
def test_chat_manifest_fields(tiny_chat_model: Path) -> None:
    manifest = manifest_of(tiny_chat_model)
    assert manifest["kind"] == "chat"
    assert manifest["runtime"] == "onnxruntime-genai"
    assert manifest["quantization"] == "fp32"
    assert manifest["name"] == "tiny-chat"
    assert manifest["embedding"] is None
    genai = json.loads((tiny_chat_model / "genai_config.json").read_text())
    assert genai["search"]["max_length"] == manifest["context_length"] == 8192
    for name in ("model.onnx", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tiny_chat_model / name).is_file(), name


@pytest.mark.slow
def test_embedding_manifest_fields(embedding_model: Path) -> None:
    manifest = manifest_of(embedding_model)
    assert manifest["kind"] == "embedding"
    assert manifest["runtime"] == "onnxruntime"
    assert manifest["context_length"] == 256  # sentence-transformers max_seq_length
    assert manifest["embedding"] == {"dimensions": 384, "pooling": "mean", "normalize": True}


# ---------------------------------------------------------------------------- chat


@pytest.mark.slow
def test_tiny_chat_generates_with_genai(tiny_chat_model: Path) -> None:
    prompt = render(tiny_chat_model, [{"role": "user", "content": "hello"}])
    first = greedy(tiny_chat_model, prompt, 24)
    assert len(first) >= 4
    assert all(0 <= t < 2048 for t in first)
    assert greedy(tiny_chat_model, prompt, 24) == first  # greedy is deterministic
    assert len(set(first)) > 1  # not one repeated token


@pytest.mark.slow
def test_genai_tokenizer_matches_hf_tokenizers(tiny_chat_model: Path) -> None:
    text = render(
        tiny_chat_model,
        [
            {"role": "system", "content": "You control a home. Ünïcode ☃ too."},
            {"role": "user", "content": "turn on the kitchen light"},
        ],
        tools=[{"type": "function", "function": {"name": "HassTurnOn", "parameters": {}}}],
    )
    genai_ids = list(og.Tokenizer(og.Model(str(tiny_chat_model))).encode(text))
    hf_ids = Tokenizer.from_file(str(tiny_chat_model / "tokenizer.json")).encode(text).ids
    assert genai_ids == hf_ids


def test_chat_template_renders_tools_and_tool_turns() -> None:
    folder = REPO / "scripts" / "export"
    tools = [
        {
            "type": "function",
            "function": {"name": "HassTurnOn", "parameters": {"type": "object"}},
        }
    ]
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "turn on the kitchen light"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {
                        "name": "HassTurnOn",
                        "arguments": '{"name": "kitchen light"}',
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"success": true}'},
    ]
    text = render(folder, messages, tools=tools)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert '<tools>\n{"type": "function", "function": {"name": "HassTurnOn"' in text
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "HassTurnOn", '
        '"arguments": {"name": "kitchen light"}}\n</tool_call><|im_end|>\n'
    ) in text
    assert (
        '<|im_start|>user\n<tool_response>\n{"success": true}\n</tool_response><|im_end|>\n'
    ) in text
    assert text.endswith("<|im_start|>assistant\n")
    plain = render(folder, [{"role": "user", "content": "hi"}])
    assert plain == (
        "<|im_start|>system\nYou are Hearth, a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.slow
def test_int4_export_quantizes_lm_head() -> None:
    folder = model_fixtures.tiny_chat_model_int4()
    assert manifest_of(folder)["quantization"] == "int4"
    report = graph_report(folder)
    # The tied head is quantized (int4, shared with the embedding lookup), not a float
    # MatMul against a Transpose of the embedding table.
    assert report["lm_head_op"] == "MatMulNBits"
    assert not report["lm_head_float"]
    assert report["transposes"] == []
    assert report["large_float_initializers"] == []
    prompt = render(folder, [{"role": "user", "content": "hello"}])
    assert len(greedy(folder, prompt, 8)) >= 1


@pytest.mark.slow
def test_untie_always_gives_lm_head_its_own_quantized_weights(tmp_path: Path) -> None:
    source = tmp_path / "hf"
    make_tiny(tmp_path / "fp32", hf_dir=source)
    assert json.loads((source / "config.json").read_text())["tie_word_embeddings"] is True
    result = export_model(
        str(source), str(tmp_path / "int4"), "--quant", "int4", "--untie", "always"
    )
    assert result.returncode == 0, result.stderr
    assert "untied lm_head" in result.stderr
    report = graph_report(tmp_path / "int4")
    assert report["lm_head_op"] == "MatMulNBits"
    assert not report["lm_head_float"]
    assert report["transposes"] == []
    assert greedy(tmp_path / "int4", "<|im_start|>user\nhi<|im_end|>\n", 4)


# ---------------------------------------------------------------------------- embedding


@pytest.mark.slow
def test_embedding_related_sentences_are_closer(embedding_model: Path) -> None:
    tokenizer = Tokenizer.from_file(str(embedding_model / "tokenizer.json"))
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    session = ort.InferenceSession(
        str(embedding_model / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    inputs = {i.name for i in session.get_inputs()}
    sentences = [
        "Turn on the kitchen light",
        "Switch the lamp in the kitchen on",
        "The stock market fell sharply today",
    ]
    encoded = tokenizer.encode_batch(sentences)
    ids = np.array([e.ids for e in encoded], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encoded], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in inputs:
        feeds["token_type_ids"] = np.zeros_like(ids)
    hidden = session.run(None, feeds)[0]
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    vectors = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    assert vectors.shape == (3, 384)
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > 0.6
    assert similarity[0, 1] > similarity[0, 2] + 0.3
    assert similarity[1, 0] > similarity[1, 2] + 0.3


# ---------------------------------------------------------------------------- bad input


def test_missing_source_folder_fails(tmp_path: Path) -> None:
    result = export_model(str(tmp_path / "nope"), str(tmp_path / "out"))
    assert result.returncode != 0
    assert "source folder not found" in result.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_quant_fails(tmp_path: Path) -> None:
    result = export_model(str(tmp_path), str(tmp_path / "out"), "--quant", "int3")
    assert result.returncode != 0
    assert "invalid choice: 'int3'" in result.stderr


def test_folder_without_config_fails(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    result = export_model(str(tmp_path / "src"), str(tmp_path / "out"))
    assert result.returncode != 0
    assert "has no config.json" in result.stderr


def test_non_empty_output_fails(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result = export_model(str(tmp_path / "src"), str(tmp_path / "out"))
    assert result.returncode != 0
    assert "output folder is not empty" in result.stderr
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_bad_context_length_fails(tmp_path: Path) -> None:
    result = export_model(str(tmp_path), str(tmp_path / "out"), "--context-length", "0")
    assert result.returncode != 0
    assert "must be positive" in result.stderr
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 512})
    )
    result = export_model(str(tmp_path / "src"), str(tmp_path / "out"), "--context-length", "4096")
    assert result.returncode != 0
    assert "exceeds the model's maximum (512)" in result.stderr


def test_undecidable_kind_fails(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps({"model_type": "mystery"}))
    result = export_model(str(tmp_path / "src"), str(tmp_path / "out"))
    assert result.returncode != 0
    assert "pass --kind" in result.stderr


def test_int4_embedding_fails(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    result = export_model(str(tmp_path / "src"), str(tmp_path / "out"), "--quant", "int4")
    assert result.returncode != 0
    assert "int4 is for chat models" in result.stderr


@pytest.mark.slow
def test_optimum_path_serves_with_genai(tmp_path: Path) -> None:
    """Architectures the genai builder lacks go through optimum plus a written
    genai_config.json; forced here on the tiny Llama to compare with the builder."""
    source = tmp_path / "hf"
    make_tiny(tmp_path / "builder", hf_dir=source)
    fp32 = export_model(str(source), str(tmp_path / "fp32"), "--via", "optimum", "--quant", "fp32")
    assert fp32.returncode == 0, fp32.stderr
    prompt = "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert greedy(tmp_path / "fp32", prompt, 16) == greedy(tmp_path / "builder", prompt, 16)
    assert manifest_of(tmp_path / "fp32")["runtime"] == "onnxruntime-genai"

    int4 = export_model(str(source), str(tmp_path / "int4"), "--via", "optimum", "--quant", "int4")
    assert int4.returncode == 0, int4.stderr
    assert "untied lm_head" in int4.stderr
    report = graph_report(tmp_path / "int4")
    assert report["lm_head_op"] == "MatMulNBits"
    assert not report["lm_head_float"]
    # only the embedding table (a Gather, one row per token) stays float
    assert [i["name"] for i in report["large_float_initializers"]] == ["model.embed_tokens.weight"]
    assert len(greedy(tmp_path / "int4", prompt, 8)) >= 1
