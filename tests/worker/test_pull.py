"""Pulling models from a (fake, local) Hugging Face Hub: hearth_worker.pull and
`hearth-worker pull` / `models list` / `models remove`."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fakehub import FakeHub
from hearth_worker.manifest import MANIFEST_NAME, load_manifest
from hearth_worker.pull import (
    PARTIAL_DIR,
    SPACE_MARGIN_BYTES,
    PullError,
    PullProgress,
    default_models_dir,
    display_name,
    installed_models,
    parse_source,
    pull_model,
    remove_model,
)
from worker_process import start_worker

REPO = "acme/Tiny-chat-onnx"
FOLDER = "cpu_and_mobile/cpu-fp32-rtn"
SOURCE = f"{REPO}:{FOLDER}"
DATA = f"{FOLDER}/model.onnx.data"  # the large (LFS) file: 3.3 MB
INSTALLED = "acme--Tiny-chat-onnx--cpu_and_mobile--cpu-fp32-rtn"


@pytest.fixture
def hub(tiny_chat_model: Path) -> Iterator[FakeHub]:
    with FakeHub() as fake:
        fake.add_repo(
            REPO,
            {FOLDER: tiny_chat_model, "cpu_and_mobile/cpu-int4-other": tiny_chat_model},
            files={"README.md": b"# Tiny chat\n"},
        )
        fake.add_repo(
            "acme/not-a-model",
            files={"README.md": b"# Notes\n", "weights/data.bin": b"\0" * 4096},
        )
        yield fake


def pull(hub: FakeHub, models_dir: Path, source: str = SOURCE, **kwargs: Any) -> Path:
    return pull_model(source, models_dir, endpoint=hub.url, **kwargs)


def error_of(hub: FakeHub, models_dir: Path, source: str = SOURCE, **kwargs: Any) -> PullError:
    with pytest.raises(PullError) as caught:
        pull(hub, models_dir, source, **kwargs)
    assert "\n" not in caught.value.message
    return caught.value


def nothing_installed(models_dir: Path) -> bool:
    visible = [p for p in models_dir.iterdir()] if models_dir.is_dir() else []
    return all(p.name == PARTIAL_DIR for p in visible) and not installed_models(models_dir)


def test_parse_source() -> None:
    assert parse_source("microsoft/Phi-4-mini-instruct-onnx").subfolder == ""
    hub_source = parse_source(" owner/name:cpu_and_mobile/cpu-int4-rtn-block-32/ ")
    assert (hub_source.repo_id, hub_source.subfolder) == (
        "owner/name",
        "cpu_and_mobile/cpu-int4-rtn-block-32",
    )
    assert hub_source.folder_name == "owner--name--cpu_and_mobile--cpu-int4-rtn-block-32"
    for bad in ("name", "a/b/c", "owner/name:../x", "/x", "owner/na me", ""):
        with pytest.raises(ValueError):
            parse_source(bad)


def test_display_name() -> None:
    phi = parse_source(
        "microsoft/Phi-4-mini-instruct-onnx:cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4"
    )
    assert display_name(phi) == "Phi-4-mini-instruct-onnx-cpu-int4"
    assert display_name(parse_source("Xenova/all-MiniLM-L6-v2:onnx")) == "all-MiniLM-L6-v2"
    assert display_name(parse_source("acme/Model")) == "Model"


def test_quantization_from_names_in_the_catalog() -> None:
    from hearth_worker.pull import guess_quantization

    for source, quant in [
        ("microsoft/Phi-4-mini-instruct-onnx:cpu_and_mobile/cpu-int4-rtn-block-32", "int4"),
        ("amd/Qwen2.5-0.5B-Instruct-quantized_int4-float16-cpu-onnx", "int4"),
        ("amd/Llama-3.2-1B-Instruct-awq-uint4-float16-cpu-onnx", "int4"),
        ("microsoft/Phi-3-mini-4k-instruct-onnx:cuda/cuda-fp16", "fp16"),
        ("Xenova/bge-small:onnx/quantized", "int8"),
        ("sentence-transformers/all-MiniLM-L6-v2:onnx", None),
    ]:
        assert guess_quantization(source) == quant, source


def test_good_pull_is_served_by_a_worker(
    hub: FakeHub, tiny_chat_model: Path, tmp_path: Path
) -> None:
    models_dir = tmp_path / "models"
    seen: list[PullProgress] = []
    path = pull(hub, models_dir, progress=seen.append)

    assert path == models_dir / INSTALLED
    manifest = load_manifest(path)
    assert manifest.name == "Tiny-chat-onnx-cpu-fp32"
    assert (manifest.kind, manifest.runtime, manifest.quantization) == (
        "chat",
        "onnxruntime-genai",
        "fp32",
    )
    assert manifest.context_length == 8192  # from genai_config.json
    written = json.loads((path / MANIFEST_NAME).read_text())
    assert written["source"] == SOURCE
    original = json.loads((tiny_chat_model / MANIFEST_NAME).read_text())
    assert written["files"] == original["files"]  # the same files, sizes and sha256
    assert written["size_bytes"] == original["size_bytes"]
    # Only the chosen folder's files were downloaded (not the other variant, not README).
    fetched = {re.sub(r".*/resolve/[^/]+/", "", p) for _, p in hub.requests if "/resolve/" in p}
    assert fetched == {f"{FOLDER}/{f['path']}" for f in original["files"]}
    phases = [p.phase for p in seen]
    assert phases[0] == "resolving" and phases[-1] == "done"
    assert phases.index("downloading") < phases.index("verifying") < phases.index("installing")
    assert seen[-1].done_bytes == seen[-1].total_bytes == original["size_bytes"]
    assert not list((models_dir / PARTIAL_DIR).iterdir())  # nothing left behind

    # Pulling it again changes nothing and downloads nothing.
    before = len(hub.requests)
    assert pull(hub, models_dir) == path
    assert len(hub.requests) == before

    worker = start_worker([path], tmp_path / "worker", extra=["--no-warmup"])
    try:
        body = {
            "model": manifest.name,
            "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 4,
        }
        request = urllib.request.Request(
            worker.url + "/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={**worker.headers, "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, context=worker.ssl, timeout=60) as response:
            answer = json.loads(response.read())
        assert answer["model"] == manifest.name
        assert answer["choices"][0]["message"]["role"] == "assistant"
    finally:
        assert worker.stop() == 0, worker.log()


def test_embedding_model_in_the_common_layout(embedding_model: Path, tmp_path: Path) -> None:
    """onnx/model.onnx with the tokenizer and configs at the repository's root, as
    sentence-transformers and Xenova publish them."""
    from hearth_worker.embedding_engine import EmbeddingModel

    pooling = {"word_embedding_dimension": 384, "pooling_mode_mean_tokens": True}
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    root = {
        name: embedding_model / name
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt")
    }
    with FakeHub() as hub:
        hub.add_repo(
            "acme/MiniLM",
            files={
                **root,
                "onnx/model.onnx": embedding_model / "model.onnx",
                "modules.json": json.dumps(modules).encode(),
                "1_Pooling/config.json": json.dumps(pooling).encode(),
                "sentence_bert_config.json": b'{"max_seq_length": 256}',
                "README.md": b"# MiniLM\n",
            },
        )
        path = pull_model("acme/MiniLM", tmp_path / "models", endpoint=hub.url)
    manifest = load_manifest(path)
    assert (manifest.name, manifest.kind, manifest.runtime) == (
        "MiniLM",
        "embedding",
        "onnxruntime",
    )
    assert manifest.embedding == {"dimensions": 384, "pooling": "mean", "normalize": True}
    assert manifest.context_length == 256
    assert (path / "model.onnx").is_file() and (path / "tokenizer.json").is_file()
    assert not (path / "README.md").exists()
    pulled, _ = EmbeddingModel(manifest, threads=1).embed(["the kitchen light"])
    exported, _ = EmbeddingModel(load_manifest(embedding_model), threads=1).embed(
        ["the kitchen light"]
    )
    assert pulled.shape == (1, 384)
    assert np.allclose(pulled, exported, atol=1e-5)


def test_embedding_layout_with_the_subfolder_named_and_cls_pooling(tmp_path: Path) -> None:
    """BAAI/bge-small-en-v1.5:onnx: only onnx/model.onnx of the variants there; the
    tokenizer, configs and pooling module from the root."""
    config = {"architectures": ["BertModel"], "hidden_size": 384, "max_position_embeddings": 512}
    modules = [{"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    with FakeHub() as hub:
        hub.add_repo(
            "acme/bge-small",
            files={
                "config.json": json.dumps(config).encode(),
                "tokenizer.json": b"{}",
                "modules.json": json.dumps(modules).encode(),
                "1_Pooling/config.json": b'{"pooling_mode_cls_token": true}',
                "onnx/model.onnx": b"graph",
                "onnx/model_quantized.onnx": b"another graph",
                "model.safetensors": b"weights for torch",
            },
        )
        path = pull_model("acme/bge-small:onnx", tmp_path, endpoint=hub.url)
    manifest = load_manifest(path)
    assert manifest.name == "bge-small"
    assert manifest.embedding == {"dimensions": 384, "pooling": "cls", "normalize": True}
    assert manifest.context_length == 512
    assert manifest.quantization == "fp32"
    assert sorted(f["path"] for f in manifest.files) == [
        "1_Pooling/config.json",
        "config.json",
        "model.onnx",
        "modules.json",
        "tokenizer.json",
    ]


def test_a_dropped_connection_is_resumed_not_restarted(hub: FakeHub, tmp_path: Path) -> None:
    size = (hub.repos[REPO].files[DATA]).size
    hub.drop_after(REPO, DATA, 1_000_000)  # mid-file; the pull resumes by itself
    path = pull(hub, tmp_path / "models")
    load_manifest(path)
    assert hub.downloads(REPO, DATA) == 2
    assert hub.served_bytes(REPO, DATA) == size  # no byte twice


def test_network_gone_then_a_retry_resumes(hub: FakeHub, tmp_path: Path) -> None:
    models_dir = tmp_path / "models"
    size = hub.repos[REPO].files[DATA].size
    hub.drop_after(REPO, DATA, 1_000_000)
    hub.drop_after(REPO, DATA, 0)  # then the connection breaks without progress: gone
    error = error_of(hub, models_dir)
    assert error.code == "network"
    assert "model.onnx.data" in error.message and "pull again" in error.message
    assert nothing_installed(models_dir)
    partial = models_dir / PARTIAL_DIR / INSTALLED / "model.onnx.data"
    assert partial.stat().st_size == 1_000_000  # kept for the retry

    path = pull(hub, models_dir)
    load_manifest(path)
    assert hub.served_bytes(REPO, DATA) == size  # the retry fetched only the rest


@pytest.mark.parametrize(
    "corrupted",
    [DATA, f"{FOLDER}/tokenizer.json"],
    ids=["lfs-sha256", "git-blob-id"],
)
def test_a_corrupt_file_is_refused(hub: FakeHub, tmp_path: Path, corrupted: str) -> None:
    models_dir = tmp_path / "models"
    hub.corrupt(REPO, corrupted)
    error = error_of(hub, models_dir)
    assert error.code == "corrupt"
    name = corrupted.rsplit("/", 1)[-1]
    assert name in error.message
    assert nothing_installed(models_dir)
    assert not (models_dir / PARTIAL_DIR / INSTALLED / name).exists()  # deleted

    hub.corrupt(REPO, corrupted, False)  # the next try gets good bytes
    load_manifest(pull(hub, models_dir))
    assert hub.downloads(REPO, f"{FOLDER}/model.onnx") == 1  # good files kept


def test_unknown_repo(hub: FakeHub, tmp_path: Path) -> None:
    error = error_of(hub, tmp_path / "models", "acme/no-such-model")
    assert error.code == "unknown_repo"
    assert "acme/no-such-model" in error.message
    assert not (tmp_path / "models").exists()


def test_unknown_subfolder_names_the_folders_there(hub: FakeHub, tmp_path: Path) -> None:
    error = error_of(hub, tmp_path / "models", f"{REPO}:cpu_and_mobile/cpu-int8")
    assert error.code == "unknown_subfolder"
    assert "cpu_and_mobile/cpu-int8" in error.message
    assert FOLDER in error.message  # where the models are
    assert not (tmp_path / "models").exists()


def test_not_a_model(hub: FakeHub, tmp_path: Path) -> None:
    error = error_of(hub, tmp_path / "models", "acme/not-a-model")
    assert error.code == "not_a_model"
    assert "genai_config.json" in error.message


def test_quantization_from_the_graph_when_the_folder_name_does_not_say(
    tiny_chat_model: Path, tmp_path: Path
) -> None:
    from model_fixtures import tiny_chat_model_int4

    with FakeHub() as hub:
        hub.add_repo("acme/plain", {"a": tiny_chat_model, "b": tiny_chat_model_int4()})
        fp32 = pull_model("acme/plain:a", tmp_path, endpoint=hub.url, name="A")
        int4 = pull_model("acme/plain:b", tmp_path, endpoint=hub.url, name="B")
    assert load_manifest(fp32).quantization == "fp32"
    assert load_manifest(int4).quantization == "int4"  # MatMulNBits in its graph


def test_hub_paths_never_lead_outside_the_model_folder(
    tiny_chat_model: Path, tmp_path: Path
) -> None:
    with FakeHub() as hub:
        hub.add_repo(
            "acme/sneaky",
            {"m": tiny_chat_model},
            files={"m/../../../escaped.txt": b"x", "m/./dot.txt": b"y"},
        )
        path = pull_model("acme/sneaky:m", tmp_path / "models", endpoint=hub.url)
    assert not list(tmp_path.rglob("escaped.txt"))
    assert not (path / "dot.txt").exists()
    load_manifest(path)


def test_a_plain_onnx_text_generator_is_not_taken_for_an_embedding_model(
    tmp_path: Path,
) -> None:
    config = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64}
    with FakeHub() as hub:
        hub.add_repo(
            "acme/qwen-onnx",
            files={
                "config.json": json.dumps(config).encode(),
                "tokenizer.json": b"{}",
                "onnx/model.onnx": b"not really onnx",
            },
        )
        error = error_of(hub, tmp_path / "models", "acme/qwen-onnx")
    assert error.code == "not_a_model"
    assert "Qwen2ForCausalLM" in error.message
    assert nothing_installed(tmp_path / "models")


def test_too_little_disk_counts_what_is_there_already(hub: FakeHub, tmp_path: Path) -> None:
    models_dir = tmp_path / "models"
    total = sum(f.size for p, f in hub.repos[REPO].files.items() if p.startswith(f"{FOLDER}/"))
    error = error_of(hub, models_dir, free_space=lambda _: total)
    assert error.code == "no_space"
    assert str(models_dir) in error.message
    assert not [p for m, p in hub.requests if "/resolve/" in p]  # checked before downloading

    # A cancelled pull leaves part of it; the next one needs only the rest.
    cancel = threading.Event()

    def stop_midway(progress: PullProgress) -> None:
        if progress.done_bytes > 1_000_000:
            cancel.set()

    assert error_of(hub, models_dir, progress=stop_midway, cancel=cancel).code == "cancelled"
    partial = models_dir / PARTIAL_DIR / INSTALLED
    have = sum(p.stat().st_size for p in partial.iterdir())
    assert 1_000_000 < have < total
    needed = total - have + SPACE_MARGIN_BYTES
    assert error_of(hub, models_dir, free_space=lambda _: needed - 1).code == "no_space"
    load_manifest(pull(hub, models_dir, free_space=lambda _: needed))


def test_cancel_installs_nothing_and_keeps_the_partial(hub: FakeHub, tmp_path: Path) -> None:
    models_dir = tmp_path / "models"
    cancel = threading.Event()

    def stop_midway(progress: PullProgress) -> None:
        if progress.file == DATA and progress.done_bytes > 1_000_000:
            cancel.set()

    error = error_of(hub, models_dir, progress=stop_midway, cancel=cancel)
    assert error.code == "cancelled"
    assert nothing_installed(models_dir)
    partial = models_dir / PARTIAL_DIR / INSTALLED / "model.onnx.data"
    have = partial.stat().st_size
    size = hub.repos[REPO].files[DATA].size
    assert 0 < have < size

    sent_before = hub.served_bytes(REPO, DATA)  # more than `have`: socket buffers
    load_manifest(pull(hub, models_dir))
    assert hub.served_bytes(REPO, DATA) - sent_before == size - have  # only the rest


def test_a_server_that_ignores_range_sends_the_whole_file_again(
    hub: FakeHub, tmp_path: Path
) -> None:
    models_dir = tmp_path / "models"
    hub.drop_after(REPO, DATA, 1_000_000)
    hub.drop_after(REPO, DATA, 0)
    assert error_of(hub, models_dir).code == "network"
    hub.ranges = False  # the retry asks for the rest and gets all of it: written from 0
    path = pull(hub, models_dir)
    assert load_manifest(path).size_bytes == hub.repos[REPO].files[DATA].size + sum(
        f.size for p, f in hub.repos[REPO].files.items() if p.startswith(f"{FOLDER}/") and p != DATA
    )


def test_disk_filling_up_meanwhile_is_no_space(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hearth_worker import pull as pull_module

    def full(*args: object, **kwargs: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pull_module._Puller, "_fetch", full)
    error = error_of(hub, tmp_path / "models")
    assert error.code == "no_space"
    assert nothing_installed(tmp_path / "models")


def test_a_second_pull_of_a_folder_waits_for_the_first(hub: FakeHub, tmp_path: Path) -> None:
    """Another process (the worker, the CLI) pulling the same folder holds its lock."""
    models_dir = tmp_path / "models"
    (models_dir / PARTIAL_DIR).mkdir(parents=True)
    lock_path = models_dir / PARTIAL_DIR / f"{INSTALLED}.lock"
    started = threading.Event()
    outcome: dict[str, object] = {}

    def second() -> None:
        def seen(progress: PullProgress) -> None:
            started.set()

        try:
            outcome["path"] = pull(hub, models_dir, progress=seen)
        except PullError as err:
            outcome["error"] = err

    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        thread = threading.Thread(target=second)
        thread.start()
        assert started.wait(30)
        thread.join(0.5)
        assert thread.is_alive()  # waiting for the lock
        assert not [p for _, p in hub.requests if "/resolve/" in p]
        path = pull(hub, tmp_path / "elsewhere")  # the "other process" installs a copy
        (models_dir / INSTALLED).parent.mkdir(exist_ok=True)
        path.rename(models_dir / INSTALLED)
        resolved = len([p for _, p in hub.requests if "/resolve/" in p])
        fcntl.flock(lock, fcntl.LOCK_UN)
    thread.join(60)
    assert outcome.get("path") == models_dir / INSTALLED, outcome
    assert len([p for _, p in hub.requests if "/resolve/" in p]) == resolved  # none more


def test_cancel_does_not_wait_for_a_stalled_connection(hub: FakeHub, tmp_path: Path) -> None:
    hub.stall_after(REPO, DATA, 100_000)  # then nothing, the connection left open
    cancel = threading.Event()
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            pull(hub, tmp_path / "models", cancel=cancel)
        except PullError as err:
            outcome["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    partial = tmp_path / "models" / PARTIAL_DIR / INSTALLED / "model.onnx.data"
    for _ in range(600):  # the first 100 kB arrive, then nothing
        if partial.is_file() and partial.stat().st_size == 100_000:
            break
        thread.join(0.05)
    cancel.set()
    thread.join(20)  # the read timeout is 30 s: ending sooner is the cancel's doing
    assert not thread.is_alive()
    error = outcome["error"]
    assert isinstance(error, PullError) and error.code == "cancelled"


def test_installed_models_and_remove(hub: FakeHub, tmp_path: Path) -> None:
    models_dir = tmp_path / "models"
    assert installed_models(models_dir) == []
    first = pull(hub, models_dir)
    second = pull(hub, models_dir, f"{REPO}:cpu_and_mobile/cpu-int4-other", name="Other")
    assert [m.name for m in installed_models(models_dir)] == ["Other", "Tiny-chat-onnx-cpu-fp32"]
    error = error_of(hub, models_dir, f"{REPO}:{FOLDER}-copy", name="Other")
    assert error.code == "name_taken"  # before asking the hub: two models cannot share a name
    assert remove_model(models_dir, "Other") == second
    assert not second.exists()
    assert [m.path for m in installed_models(models_dir)] == [first]
    with pytest.raises(KeyError):
        remove_model(models_dir, "Other")


def test_default_models_dir(tmp_path: Path) -> None:
    assert default_models_dir(tmp_path) == tmp_path / "models"


def test_the_fake_hub_speaks_huggingface_hubs_protocol(
    hub: FakeHub, tiny_chat_model: Path, tmp_path: Path
) -> None:
    """huggingface_hub's own calls work against the fake (it stays a faithful one)."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
    from tqdm import tqdm

    api = HfApi(endpoint=hub.url)
    info = api.model_info(REPO, files_metadata=True)
    data = next(s for s in info.siblings or [] if s.rfilename == DATA)
    assert data.lfs is not None and data.lfs.size == hub.repos[REPO].files[DATA].size
    tree = api.list_repo_tree(REPO, path_in_repo=FOLDER, recursive=True)
    assert {f.path for f in tree} == {f"{FOLDER}/{p.name}" for p in tiny_chat_model.iterdir()} - {
        f"{FOLDER}/{MANIFEST_NAME}"
    }
    monitor_interval = tqdm.monitor_interval
    tqdm.monitor_interval = 0  # no monitor thread, which would outlive the test
    disable_progress_bars()
    try:
        for name in (DATA, f"{FOLDER}/tokenizer.json"):  # LFS (302 to the "CDN") and git
            local = hf_hub_download(
                REPO,
                name,
                endpoint=hub.url,
                local_dir=tmp_path / "local",
                cache_dir=tmp_path / "cache",
            )
            assert Path(local).read_bytes() == (tiny_chat_model / Path(name).name).read_bytes()
    finally:
        enable_progress_bars()
        tqdm.monitor_interval = monitor_interval
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("acme/nothing-here")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "nope.txt", endpoint=hub.url, cache_dir=tmp_path / "cache")


# ---------------------------------------------------------------------------- command line


def hearth_worker(tmp_path: Path, hub: FakeHub, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hearth_worker", "--state-dir", str(tmp_path / "state"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home")},
        check=False,
    )


@pytest.fixture
def in_process_cli(
    hub: FakeHub,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Callable[..., tuple[int, str, str]]:
    """`hearth-worker ARGS` in this process (fast), with the fake hub as the endpoint."""
    from hearth_worker.cli import main
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)

    def run(*args: str) -> tuple[int, str, str]:
        code = main(["--state-dir", str(tmp_path / "state"), *args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_cli_pull_list_remove(
    hub: FakeHub, tmp_path: Path, in_process_cli: Callable[..., tuple[int, str, str]]
) -> None:
    done = hearth_worker(tmp_path, hub, "pull", SOURCE, "--name", "Tiny")
    assert done.returncode == 0, done.stderr
    models_dir = tmp_path / "state" / "models"
    assert "Installed Tiny (chat, fp32" in done.stdout
    assert str(models_dir / INSTALLED) in done.stdout
    assert "downloading" in done.stderr and "model.onnx.data" in done.stderr  # plain lines
    assert not (tmp_path / "hf-home").exists()  # nothing in a Hugging Face cache

    code, out, _ = in_process_cli("pull", SOURCE)
    assert code == 0
    assert out.startswith("Already installed: Tiny ")

    code, out, _ = in_process_cli("models", "list")
    assert code == 0
    assert out.split("\t")[:3] == ["Tiny", "chat", "fp32"]

    code, out, _ = in_process_cli("models", "remove", "Tiny")
    assert code == 0
    assert not (models_dir / INSTALLED).exists()
    code, out, err = in_process_cli("models", "remove", "Tiny")
    assert code == 1
    assert err.strip().splitlines() == [f"hearth-worker: no model 'Tiny' in {models_dir}"]
    code, out, _ = in_process_cli("models", "list")
    assert (code, out.strip()) == (0, f"No models in {models_dir}")


@pytest.mark.parametrize(
    ("source", "words"),
    [
        ("acme/no-such-model", "acme/no-such-model"),  # PullError (the others have tests above)
        ("not a source", "owner/name"),  # ValueError
    ],
)
def test_cli_errors_are_one_line(
    tmp_path: Path,
    in_process_cli: Callable[..., tuple[int, str, str]],
    source: str,
    words: str,
) -> None:
    models_dir = tmp_path / "elsewhere"
    code, _, err = in_process_cli("pull", source, "--models-dir", str(models_dir))
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("hearth-worker: ")
    assert words in last
    assert not installed_models(models_dir)


def test_cli_ctrl_c_cancels_and_a_second_pull_resumes(hub: FakeHub, tmp_path: Path) -> None:
    hub.stall_after(REPO, DATA, 100_000)  # the download is under way when Ctrl-C comes
    models_dir = tmp_path / "models"
    command = [
        sys.executable,
        "-m",
        "hearth_worker",
        "pull",
        SOURCE,
        "--models-dir",
        str(models_dir),
    ]
    env = {**os.environ, "HF_ENDPOINT": hub.url, "PYTHONUNBUFFERED": "1"}
    # As in a terminal: Ctrl-C is not ignored. (A shell without job control starts its
    # background jobs, e.g. scripts/test's two pytest processes, with SIGINT ignored;
    # children inherit that, and Python then installs no KeyboardInterrupt handler.
    # A handler of ours is reset to the default in the child.)
    ignored = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
    finally:
        signal.signal(signal.SIGINT, ignored)
    try:
        partial = models_dir / PARTIAL_DIR / INSTALLED / "model.onnx.data"
        deadline = time.monotonic() + 60
        while not (partial.is_file() and partial.stat().st_size == 100_000):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the download did not start"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=20)  # not the 30 s read timeout
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err
    assert "Traceback" not in err
    assert "cancelled" in err.strip().splitlines()[-1]
    assert nothing_installed(models_dir)
    assert partial.stat().st_size == 100_000  # kept

    hub.stall_after(REPO, DATA, None)
    sent_before = hub.served_bytes(REPO, DATA)
    load_manifest(pull(hub, models_dir))
    size = hub.repos[REPO].files[DATA].size
    assert hub.served_bytes(REPO, DATA) - sent_before == size - 100_000  # resumed
