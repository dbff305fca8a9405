"""Report how an exported decoder computes its logits (runs in .venv-export).

usage: check_graph.py MODEL_DIR

Prints JSON: the lm_head MatMul's op type, whether it multiplies by a float
weight (an initializer or a Transpose of the embedding table), and the float
initializers of 1 MB or more. Reads the graph only, not the weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import onnx

FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
SIZES = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.BFLOAT16: 2}


def main(model_dir: Path) -> None:
    model = onnx.load(model_dir / "model.onnx", load_external_data=False)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    logits_nodes = [
        n for n in graph.node if n.name.startswith("/lm_head/") and "MatMul" in n.op_type
    ]
    head = logits_nodes[0] if logits_nodes else None
    float_head = False
    if head is not None and head.op_type == "MatMul":
        for name in head.input:
            init = inits.get(name)
            if init is not None and init.data_type in FLOATS:
                float_head = True
            producer = producers.get(name)
            if producer is not None and producer.op_type == "Transpose":
                float_head = True
    big = []
    for init in graph.initializer:
        if init.data_type in FLOATS:
            size = SIZES[init.data_type]
            for dim in init.dims:
                size *= dim
            if size >= 1 << 20:
                big.append({"name": init.name, "dims": list(init.dims), "bytes": size})
    print(
        json.dumps(
            {
                "lm_head_op": head.op_type if head is not None else None,
                "lm_head_float": float_head,
                "embedding_ops": sorted(
                    {n.op_type for n in graph.node if n.name.startswith("/model/embed_tokens/")}
                ),
                "transposes": [n.name for n in graph.node if n.op_type == "Transpose"],
                "large_float_initializers": big,
            }
        )
    )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]))
