"""The admin scope: routes that change the machine need an admin token.

Tokens made by pairing (Home Assistant's) are admin; `hearth-worker tokens create`
makes one only with `--admin`; tokens stored before scopes existed keep working
with the scope their name tells.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from hearth_worker.auth import SUPERVISOR_TOKEN_NAME, AuthStore
from hearth_worker.pairing import pair_remote
from local_pairing import pair_locally
from test_api import check_schema, model_id
from worker_process import WorkerProcess, cli, fake_supervisor, free_port, start_worker

CODE = re.compile(r"Pairing code: ([0-9A-Z]{4}-[0-9A-Z]{4})")


def no_hub() -> dict[str, str]:
    """A hub address nothing listens on: a pull that starts by mistake goes nowhere."""
    return {"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}


def admin_routes(
    model: str, source: str = "acme/tiny"
) -> list[tuple[str, str, dict[str, str] | None]]:
    """Every admin route: (method, path, JSON body)."""
    return [
        ("POST", "/v1/models/pull", {"source": source}),
        ("GET", "/v1/models/pull/pull_0123", None),
        ("DELETE", "/v1/models/pull/pull_0123", None),
        ("DELETE", f"/v1/models/{model}", None),
    ]


async def call(
    http: aiohttp.ClientSession,
    worker: WorkerProcess,
    route: tuple[str, str, dict[str, str] | None],
    token: str | None,
) -> tuple[int, dict[str, object]]:
    method, path, body = route
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.request(method, worker.url + path, json=body, headers=headers) as resp:
        return resp.status, await resp.json()


# -- the token store ----------------------------------------------------------------


def test_paired_tokens_are_admin_created_ones_only_when_asked(tmp_path: Path) -> None:
    store = AuthStore(tmp_path)
    paired, paired_info = pair_locally(store, store.new_pairing_code(), client_id="192.0.2.1")
    plain, plain_info = store.create_token("my script")
    admin, admin_info = store.create_token("ops", admin=True)
    assert paired_info.admin and admin_info.admin and not plain_info.admin
    assert [(store.verify(t) or plain_info).admin for t in (paired, plain, admin)] == [
        True,
        False,
        True,
    ]
    # Another process (the CLI) sees the same scopes.
    listed = {info.name: info.admin for info in AuthStore(tmp_path).list_tokens()}
    assert listed == {"paired from 192.0.2.1": True, "my script": False, "ops": True}


def test_tokens_stored_before_scopes_keep_working(tmp_path: Path) -> None:
    """A record without the field: admin when it came from pairing (its name says so)."""
    store = AuthStore(tmp_path)
    names = {
        "Home Assistant": True,  # what Home Assistant pairs as
        "paired from 192.0.2.7": True,  # pairing without a client name
        SUPERVISOR_TOKEN_NAME: True,  # the add-on's token for Home Assistant
        "my script": False,  # tokens create
        "Home Assistant's friend": False,
    }
    tokens = {}
    for name in names:
        tokens[name], _ = store.create_token(name)
    path = tmp_path / "tokens.json"
    data = json.loads(path.read_text())
    for record in data["tokens"]:
        del record["admin"]  # as a worker before scopes wrote it
    path.write_text(json.dumps(data))

    old = AuthStore(tmp_path)
    for name, admin in names.items():
        info = old.verify(tokens[name])
        assert info is not None, name
        assert info.admin is admin, name
    # The next write stores the scope it was read with.
    old.create_token("new")
    stored = {r["name"]: r["admin"] for r in json.loads(path.read_text())["tokens"]}
    assert stored == {**names, "new": False}


def test_a_malformed_scope_is_refused_not_guessed(tmp_path: Path) -> None:
    store = AuthStore(tmp_path)
    token, _ = store.create_token("a")
    path = tmp_path / "tokens.json"
    data = json.loads(path.read_text())
    data["tokens"][0]["admin"] = "yes"
    path.write_text(json.dumps(data))
    assert AuthStore(tmp_path).verify(token) is None
    with pytest.raises(ValueError, match="admin"):
        AuthStore(tmp_path).create_token("b")


# -- through a worker -----------------------------------------------------------------


async def test_admin_routes_need_an_admin_token(
    http: aiohttp.ClientSession, tiny_chat_model: Path, tmp_path: Path
) -> None:
    worker = start_worker([tiny_chat_model], tmp_path, extra=["--no-warmup"], env=no_hub())
    model = model_id(tiny_chat_model)
    try:
        for route in admin_routes(model):
            status, body = await call(http, worker, route, worker.token)
            assert status == 403, (route, body)
            check_schema(body, "Error")
            error = body["error"]
            assert isinstance(error, dict)
            assert error["code"] == "admin_required", route
            assert "--admin" in str(error["message"])
            status, _ = await call(http, worker, route, None)
            assert status == 401, route
        # Nothing was changed; reading the catalog needs no admin.
        async with http.get(worker.url + "/v1/models", headers=worker.headers) as resp:
            assert [m["id"] for m in (await resp.json())["data"]] == [model]
        async with http.get(worker.url + "/v1/catalog", headers=worker.headers) as resp:
            catalog = await resp.json()
            assert resp.status == 200, catalog
        check_schema(catalog, "Catalog")
        assert catalog["data"] and not any(entry["installed"] for entry in catalog["data"])

        # `tokens create --admin` makes one that passes: the answers are the routes' own
        # (a body that is no pull; unknown jobs; a --model folder).
        out = cli(worker.state_dir, "tokens", "create", "ops", "--admin")
        assert ", admin" in out.splitlines()[0]
        admin = out.strip().splitlines()[-1]
        routes = admin_routes(model, source="not a source")
        answers = [(await call(http, worker, r, admin))[0] for r in routes]
        assert answers == [400, 404, 404, 409], answers

        listing = dict(
            (line.split("\t")[3], line.split("\t")[2])
            for line in cli(worker.state_dir, "tokens", "list").splitlines()
        )
        assert listing == {"tests": "user", "ops": "admin"}
    finally:
        assert await worker.astop() == 0, worker.log()


async def test_a_paired_token_is_admin(
    http: aiohttp.ClientSession, tiny_chat_model: Path, tmp_path: Path
) -> None:
    worker = start_worker(
        [tiny_chat_model], tmp_path, token=False, extra=["--no-warmup"], env=no_hub()
    )
    try:
        code = CODE.search(worker.log())
        assert code, worker.log()
        paired = await asyncio.to_thread(pair_remote, worker.url, code.group(1), "Home Assistant")
        route = ("DELETE", f"/v1/models/{model_id(tiny_chat_model)}", None)
        status, body = await call(http, worker, route, paired.token)
        assert status == 409, body  # past the admin check: a --model folder stays
        listing = cli(worker.state_dir, "tokens", "list")
        assert "\tadmin\tHome Assistant" in listing, listing
    finally:
        assert await worker.astop() == 0, worker.log()


async def test_the_token_announced_to_home_assistant_through_the_supervisor_is_admin(
    http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """The add-on starts without a model and hands Home Assistant an admin token."""
    announced: list[dict[str, object]] = []

    async def discovery(request: web.Request) -> web.Response:
        if request.method == "POST":
            announced.append(await request.json())
        return web.json_response({"result": "ok", "data": {"uuid": "uuid1"}})

    async with fake_supervisor(discovery) as supervisor_url:
        env = {
            **no_hub(),
            "SUPERVISOR_URL": supervisor_url,
            "SUPERVISOR_TOKEN": "supervisor-secret",
        }
        worker = start_worker(
            [], tmp_path, token=False, extra=["--no-warmup", "--supervisor-discovery"], env=env
        )
        try:
            for _ in range(600):  # announced right after listening
                if announced:
                    break
                await asyncio.sleep(0.05)
            config = announced[0]["config"]
            assert isinstance(config, dict)
            route = ("DELETE", "/v1/models/pull/pull_0123", None)
            status, body = await call(http, worker, route, str(config["token"]))
            assert status == 404, body  # past the admin check: no such job
            listing = cli(worker.state_dir, "tokens", "list")
            assert f"\tadmin\t{SUPERVISOR_TOKEN_NAME}" in listing, listing
        finally:
            assert await worker.astop() == 0, worker.log()
