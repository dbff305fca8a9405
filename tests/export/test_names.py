"""Display names: a model is named from its own metadata, not from a folder called `hf`.

The name choice is scripts/export/export_model.py's model_name() (standard library only),
checked here on folders that hold only metadata, without building a model; the cached
tiny model (made from a folder called hf) shows the whole export path does the same.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import model_fixtures
import pytest

REPO = model_fixtures.REPO
EXPORT_PY = REPO / "scripts" / "export" / "export_model.py"


def export_module() -> Any:
    spec = importlib.util.spec_from_file_location("hearth_export_model", EXPORT_PY)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


export = export_module()


def model_folder(
    path: Path,
    *,
    config: dict[str, Any] | None = None,
    tokenizer: dict[str, Any] | None = None,
    readme: str | None = None,
) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(
        json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"], **(config or {})})
    )
    if tokenizer is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    if readme is not None:
        (path / "README.md").write_text(readme)
    return path


def test_folder_called_hf_is_named_by_its_config(tmp_path: Path) -> None:
    folder = model_folder(
        tmp_path / "hf", config={"_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}
    )
    assert export.model_name(folder) == "SmolLM2-135M-Instruct"
    # a card whose heading is only the family name does not shorten it
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n\n# SmolLM2\n")
    assert export.model_name(folder) == "SmolLM2-135M-Instruct"


def test_local_name_or_path_gives_its_last_telling_part(tmp_path: Path) -> None:
    folder = model_folder(
        tmp_path / "hf", config={"_name_or_path": "/home/ann/train/kitchen-llama/hf/"}
    )
    assert export.model_name(folder) == "kitchen-llama"


def test_tokenizer_name_when_the_config_has_none(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "hf", tokenizer={"name_or_path": "Qwen/Qwen2.5-0.5B-Instruct"})
    assert export.model_name(folder) == "Qwen2.5-0.5B-Instruct"


def test_model_card_names(tmp_path: Path) -> None:
    base = {"_name_or_path": "nreimers/MiniLM-L6-H384-uncased"}  # the base model
    # all-MiniLM-L6-v2's card: the heading is the model, the config names its base
    card = "---\nlanguage: en\ntags:\n- sentence-transformers\n---\n\n# all-MiniLM-L6-v2\n"
    assert export.model_name(model_folder(tmp_path / "a" / "model", config=base, readme=card)) == (
        "all-MiniLM-L6-v2"
    )
    # a declared name wins; a template or prose heading is not a name
    declared = "---\nmodel-index:\n- name: kitchen-tuned-v2\n  results: []\n---\n"
    declared += "# Model Card for Model ID\n"
    assert export.model_name(model_folder(tmp_path / "b" / "hf", readme=declared)) == (
        "kitchen-tuned-v2"
    )
    prose = "```\n# not a heading\n```\n# A model that answers questions\n"
    assert export.model_name(model_folder(tmp_path / "c" / "hf", config=base, readme=prose)) == (
        "MiniLM-L6-H384-uncased"
    )


def test_folder_names_without_metadata(tmp_path: Path) -> None:
    assert export.model_name(model_folder(tmp_path / "smollm2" / "hf")) == "smollm2"
    assert export.model_name(model_folder(tmp_path / "my-model")) == "my-model"
    snapshot = tmp_path / "models--Qwen--Qwen2.5-0.5B-Instruct" / "snapshots" / ("a1" * 20)
    assert export.model_name(model_folder(snapshot)) == "Qwen2.5-0.5B-Instruct"


def test_names_are_ids() -> None:
    assert export.clean_name("Smollm2 135M  Instruct") == "Smollm2 135M Instruct"
    assert export.clean_name("Meta/Llama\\3\t8B\n") == "Meta-Llama-3 8B"
    assert export.clean_name(" \x00 ") == ""
    assert len(export.clean_name("x" * 500)) == export.NAME_MAX
    assert export.name_problem("Kitchen helper 2") is None
    assert "slash" in export.name_problem("owner/name")
    assert export.name_problem("  ") == "it is empty"
    assert "control" in export.name_problem("a\x07b")


def test_name_option_with_a_slash_is_refused(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "hf")
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    done = subprocess.run(
        [sys.executable, str(EXPORT_PY), str(folder), str(tmp_path / "out"), "--name", "a/b"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 2
    assert "--name 'a/b' cannot be a model id: it contains a slash" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cached_tiny_model_is_named_from_its_metadata() -> None:
    """scripts/make_test_model exports its Hugging Face folder, called hf, without
    --name: the manifest's name comes from the folder's config (_name_or_path)."""
    manifest = json.loads((model_fixtures.tiny_chat_model() / "hearth-model.json").read_text())
    assert manifest["name"] == "tiny-chat"
