"""The `hearth-worker` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, web

from . import API_VERSION, __version__
from . import settings as settings_module
from .auth import SUPERVISOR_TOKEN_NAME, AuthStore
from .connections import BindError, Listener, bind
from .discovery import Advertiser
from .manifest import ManifestError
from .server import Worker
from .settings import WorkerSettings
from .supervisor import announce, withdraw
from .tls import Certificate, ensure_certificate

_LOGGER = logging.getLogger("hearth_worker")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hearth-worker", description="Serve ONNX models to Hearth in Home Assistant."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    settings_module.add_arguments(parser, top_level=True)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve models")
    settings_module.add_arguments(serve)

    sub.add_parser("pair", help="show a new pairing code (valid 15 minutes)")
    sub.add_parser(
        "cert",
        help="show the TLS certificate's path and SHA-256 fingerprint (made if missing)",
    )

    recommend = sub.add_parser(
        "recommend", help="show which catalog models fit this machine and how to pull them"
    )
    recommend.add_argument(
        "--models-dir",
        type=Path,
        default=None,
        help="where models are stored; free disk is measured there (default: <state-dir>/models)",
    )
    recommend.add_argument("--json", action="store_true", help="print JSON (for scripts)")

    models_dir_help = "where models are kept (default: <state-dir>/models, which serve uses)"
    pull = sub.add_parser(
        "pull",
        help="download a model from Hugging Face (resumable; Ctrl-C cancels, pull again resumes)",
    )
    pull.add_argument(
        "source",
        help="owner/name or owner/name:sub/folder: an onnxruntime-genai chat model "
        "(a folder with genai_config.json) or an ONNX embedding model",
    )
    pull.add_argument("--name", default=None, help="name shown in Home Assistant")
    pull.add_argument("--models-dir", type=Path, default=None, help=models_dir_help)
    models = sub.add_parser("models", help="list or remove the models in the models folder")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    models_list = models_sub.add_parser("list", help="list installed models")
    models_list.add_argument("--models-dir", type=Path, default=None, help=models_dir_help)
    models_remove = models_sub.add_parser("remove", help="delete an installed model")
    models_remove.add_argument("model_id", help="the model's name (as 'models list' shows it)")
    models_remove.add_argument("--models-dir", type=Path, default=None, help=models_dir_help)

    tokens = sub.add_parser("tokens", help="list or revoke the tokens of paired clients")
    tokens_sub = tokens.add_subparsers(dest="tokens_command", required=True)
    tokens_sub.add_parser("list", help="list tokens")
    create = tokens_sub.add_parser(
        "create", help="issue a token without pairing, e.g. for an OpenAI client (shown once)"
    )
    create.add_argument("name", help="who the token is for (shown by 'tokens list')")
    create.add_argument(
        "--admin",
        action="store_true",
        help="the token may also pull and remove models (pairing tokens may; others not)",
    )
    revoke = tokens_sub.add_parser("revoke", help="revoke a token")
    revoke.add_argument("token_id")
    return parser


def _show_code(auth: AuthStore) -> None:
    code = auth.new_pairing_code()
    minutes = round(((auth.pairing_code_expires_at() or time.time()) - time.time()) / 60)
    print(f"Pairing code: {code}  (valid {minutes} minutes)", flush=True)


def _certificate(auth: AuthStore) -> Certificate:
    from .discovery import host_label  # noqa: PLC0415

    names = ["localhost", socket.gethostname(), f"{host_label(auth.node_id)}.local"]
    return ensure_certificate(auth.state_dir, auth.node_id, names)


async def _serve(
    settings: WorkerSettings, auth: AuthStore, stop: asyncio.Event | None = None
) -> None:
    """Start the worker, serve until SIGINT or SIGTERM (or until ``stop`` is set), stop it.

    Each start is paired with its stop on one exit stack, right where it starts: leaving
    stops what started, in reverse order, and a start that fails stops what started
    before it.
    """
    try:
        limits = settings.connection_limits()
    except ValueError as err:
        raise BindError(f"bad connection limits: {err}") from err
    settings = settings.with_default_models_dir()
    loop = asyncio.get_running_loop()
    async with contextlib.AsyncExitStack() as stack:
        # Last out: a second Ctrl-C while stopping does not cut the stopping short.
        signals: list[signal.Signals] = []
        stack.callback(_remove_signal_handlers, loop, signals)
        # Bound (not yet listening) before anything slow: a taken port is reported at once.
        sock = stack.enter_context(bind(settings.host, settings.port))
        cert = None if settings.plain_http else _certificate(auth)
        worker = Worker(settings, auth, fingerprint=cert.fingerprint if cert else b"")
        await loop.run_in_executor(None, worker.models.load)
        runner = web.AppRunner(
            worker.build_app(),
            handler_cancellation=True,
            access_log=None,
            keepalive_timeout=limits.keepalive_timeout_s,
        )
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        if not settings.supervisor_discovery and not auth.paired:
            _show_code(auth)  # before listening: a client that sees us can pair at once
            print(
                "Enter it in Home Assistant when it offers to add this Hearth worker.", flush=True
            )
        assert runner.server is not None
        listener = Listener(
            sock,
            runner.server,
            ssl_context=cert.server_context() if cert else None,
            limits=limits,
        )
        listener.start()
        stack.push_async_callback(listener.close)
        worker.models.jobs.pull_missing(settings.pulls)  # beside what it serves already
        port = listener.port  # the real port when --port 0 asked for any free one
        scheme = "https" if cert else "http"
        _LOGGER.info(
            "Hearth worker %s listening on %s://%s:%d", __version__, scheme, settings.host, port
        )
        if cert:
            _LOGGER.info(
                "TLS certificate %s, SHA-256 fingerprint %s",
                cert.cert_path,
                cert.fingerprint_display,
            )
        else:
            _LOGGER.warning(
                "Serving plain HTTP (--plain-http): tokens and requests are not encrypted"
            )

        if settings.advertise:
            advertiser = Advertiser(
                node_id=worker.node_id,
                name=settings.name,
                port=port,
                version=__version__,
                api_version=API_VERSION,
                paired=auth.paired,
                addresses=settings.advertise_addresses,
                scheme=scheme,
            )
            await advertiser.start()
            stack.push_async_callback(advertiser.stop)
            worker.on_paired.append(lambda: advertiser.update(paired=True))

        if settings.supervisor_discovery:
            config = {
                "host": settings.discovery_host,
                "port": port,
                "node_id": worker.node_id,
                # The Supervisor channel is trusted: Home Assistant pins this fingerprint.
                "scheme": scheme,
                **({"fingerprint": cert.fingerprint_hex} if cert else {}),
            }
            await _announce(stack, auth, config)

        if stop is None:
            stop = asyncio.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
                signals.append(sig)
        await stop.wait()
        _LOGGER.info("Stopping")


async def _announce(
    stack: contextlib.AsyncExitStack, auth: AuthStore, config: dict[str, Any]
) -> None:
    """Announce this worker through the Supervisor (the add-on), with a fresh admin token
    in ``config``; the announcement is withdrawn when ``stack`` closes."""
    session = await stack.enter_async_context(ClientSession())
    for token_info in auth.list_tokens():
        if token_info.name == SUPERVISOR_TOKEN_NAME:
            auth.revoke(token_info.token_id)
    token, _ = auth.create_token(SUPERVISOR_TOKEN_NAME, admin=True)
    supervisor_url = os.environ.get("SUPERVISOR_URL", "http://supervisor")
    supervisor_token = os.environ.get("SUPERVISOR_TOKEN", "")
    uuid = await announce(
        session,
        config={**config, "token": token},
        supervisor_url=supervisor_url,
        supervisor_token=supervisor_token,
    )
    stack.push_async_callback(
        functools.partial(
            withdraw,
            session,
            uuid=uuid,
            supervisor_url=supervisor_url,
            supervisor_token=supervisor_token,
        )
    )
    _LOGGER.info("Announced to Home Assistant through the Supervisor")


def _remove_signal_handlers(loop: asyncio.AbstractEventLoop, signals: list[signal.Signals]) -> None:
    for sig in signals:
        loop.remove_signal_handler(sig)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("pull", "models"):
        from . import pull  # noqa: PLC0415 (huggingface_hub loads only for these commands)

        models_dir = args.models_dir or pull.default_models_dir(args.state_dir)
        if args.command == "pull":
            return pull.run_pull(args.source, models_dir, args.name)
        if args.models_command == "list":
            return pull.run_models_list(models_dir)
        return pull.run_models_remove(models_dir, args.model_id)
    if args.command == "recommend":
        from .catalog import run_recommend  # noqa: PLC0415 (only this command needs it)
        from .pull import default_models_dir  # noqa: PLC0415

        models_dir = args.models_dir or default_models_dir(args.state_dir)
        print(run_recommend(models_dir, as_json=args.json, explicit_dir=bool(args.models_dir)))
        return 0
    auth = AuthStore(args.state_dir)
    if args.command == "pair":
        _show_code(auth)
        return 0
    if args.command == "cert":
        cert = _certificate(auth)
        print(f"Certificate: {cert.cert_path}")
        print(f"SHA-256 fingerprint: {cert.fingerprint_display}")
        return 0
    if args.command == "tokens":
        if args.tokens_command == "create":
            token, info = auth.create_token(args.name, admin=args.admin)
            scope = ", admin" if info.admin else ""
            print(f"Token {info.token_id} for {info.name}{scope} (shown only this once):")
            print(token)
            return 0
        if args.tokens_command == "list":
            for info in auth.list_tokens():
                created = time.strftime("%Y-%m-%d %H:%M", time.localtime(info.created_at))
                scope = "admin" if info.admin else "user"
                print(f"{info.token_id}\t{created}\t{scope}\t{info.name}")
            return 0
        if auth.revoke(args.token_id):
            print(f"Revoked {args.token_id}")
            return 0
        print(f"No token {args.token_id}", file=sys.stderr)
        return 1
    settings = WorkerSettings.from_args(args)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(_serve(settings, auth))
    except ManifestError as err:
        print(f"hearth-worker: {err}", file=sys.stderr)
        return 2
    except BindError as err:
        print(f"hearth-worker: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
