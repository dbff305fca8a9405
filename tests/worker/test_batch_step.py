"""scripts/bench/batch_step.py (the batched-decoding probe of docs/ARCHITECTURE.md).

It must keep running, and what it rests on must hold: a right-padded batch gives
each sequence what it gets alone, and a batch slot seeded from an onnxruntime-genai
generator's KV cache continues that generator. Checked on the tiny test model; no
rate is asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys

import model_fixtures

PROBE = model_fixtures.REPO / "scripts" / "bench" / "batch_step.py"


def test_probe_runs_and_batches_exactly() -> None:
    model = model_fixtures.tiny_chat_model()
    done = subprocess.run(
        [
            sys.executable,
            str(PROBE),
            "--model",
            str(model),
            "--threads",
            "1",
            "--past",
            "8,40",
            "--rounds",
            "1",
            "--steps",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["exact"]["greedy_tokens_equal"] is True
    assert figures["exact"]["max_abs_logit_diff"] < 1e-3
    assert figures["genai_kv_seed"]["next_token_equal"] is True
    assert figures["genai_kv_seed"]["max_abs_kv_diff"] < 1e-3
    for table in (figures["tok_s"], figures["tok_per_cpu_s"]):
        assert set(table) == {"8", "40"}
        for row in table.values():
            assert set(row) == {"1", "2", "4"}
            assert all(rate > 0 for rate in row.values())
