"""Quantize an embedding model's weights to int8 in place (runs in .venv-export-optimum).

usage: quantize_embedding.py MODEL.onnx
"""

from __future__ import annotations

import sys
from pathlib import Path

from onnxruntime.quantization import QuantType, quantize_dynamic


def main(model: Path) -> None:
    quantized = model.with_name(model.stem + ".int8.onnx")
    quantize_dynamic(model, quantized, weight_type=QuantType.QInt8)
    quantized.replace(model)
    for extra in model.parent.glob(model.name + "*.data"):
        extra.unlink()  # external data of the float model, now unused


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]))
