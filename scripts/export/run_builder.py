"""Run the onnxruntime-genai model builder on configs it can read (runs in .venv-export).

usage: run_builder.py BUILDER_ARGS...   (as `python -m onnxruntime_genai.models.builder`)

The builder (0.18) reads a model's config through transformers' AutoConfig and
expects one flat `rope_parameters` dict with a `rope_type`. transformers 5 loads
some configs with rope parameters per attention type instead (Gemma 3:
{"full_attention": {...}, "sliding_attention": {...}}, the local theta no longer a
`rope_local_base_freq` attribute): whatever config.json says, hub release or one
written from a GGUF, the builder then fails with KeyError 'rope_type'. Here the
loaded config gets the flat keys the builder reads beside the nested ones (which
builders that know the nested form, Gemma 4, keep reading); configs without nested
rope parameters pass unchanged.
"""

from __future__ import annotations

import runpy
import sys
from typing import Any

import transformers


def flatten_rope(config: Any) -> None:
    for part in (config, getattr(config, "text_config", None)):
        params = getattr(part, "rope_parameters", None)
        if not isinstance(params, dict) or "rope_type" in params:
            continue
        full = params.get("full_attention")
        sliding = params.get("sliding_attention")
        if not isinstance(full, dict) or "rope_type" not in full:
            continue
        part.rope_parameters = {**params, **full}
        if isinstance(sliding, dict) and getattr(part, "rope_local_base_freq", None) is None:
            part.rope_local_base_freq = sliding.get("rope_theta", full.get("rope_theta"))


def main(argv: list[str]) -> None:
    auto_config = transformers.AutoConfig
    load = auto_config.from_pretrained

    def from_pretrained(*args: Any, **kwargs: Any) -> Any:
        config = load(*args, **kwargs)
        flatten_rope(config)
        return config

    auto_config.from_pretrained = from_pretrained  # type: ignore[method-assign]
    sys.argv = ["onnxruntime_genai.models.builder", *argv]
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
