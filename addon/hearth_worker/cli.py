"""The `hearth-worker` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from aiohttp import ClientSession, web

from . import API_VERSION, __version__
from .auth import SUPERVISOR_TOKEN_NAME, AuthStore
from .connections import BindError, ConnectionLimits, Listener, bind
from .discovery import Advertiser
from .manifest import ManifestError
from .prompt_cache import DEFAULT_BUDGET_MB
from .pull import default_models_dir
from .server import Worker, WorkerOptions
from .supervisor import announce, withdraw
from .tls import Certificate, ensure_certificate

_LOGGER = logging.getLogger("hearth_worker")


def default_state_dir() -> Path:
    if env := os.environ.get("HEARTH_STATE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "hearth-worker"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hearth-worker", description="Serve ONNX models to Hearth in Home Assistant."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=default_state_dir(),
        help="where the node id, pairing code and token hashes live (default: %(default)s)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve models")
    serve.add_argument(
        "--model",
        dest="models",
        type=Path,
        action="append",
        default=[],
        help="also serve this model folder (made by scripts/export_model; repeat for several); "
        "it cannot be removed through the API",
    )
    serve.add_argument(
        "--models-dir",
        type=Path,
        default=None,
        help="serve every model folder in this folder; pulled models land here "
        "(default: <state-dir>/models)",
    )
    serve.add_argument(
        "--pull",
        dest="pulls",
        metavar="SOURCE",
        action="append",
        default=[],
        help="pull this model (owner/name or owner/name:sub/folder) into --models-dir unless "
        "it is there, while serving what is (repeat for several; progress in the log)",
    )
    serve.add_argument("--host", default="0.0.0.0", help="address to listen on")  # noqa: S104
    serve.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    serve.add_argument("--name", default=socket.gethostname(), help="name shown in Home Assistant")
    serve.add_argument("--max-running", type=int, default=1, help="concurrent generations")
    serve.add_argument("--max-queued", type=int, default=8, help="requests waiting beyond those")
    serve.add_argument(
        "--prompt-cache-mb",
        type=int,
        default=DEFAULT_BUDGET_MB,
        help="memory for the prompt cache (KV caches of recent prompts, reused by later "
        f"turns and conversations; 0 turns it off; default {DEFAULT_BUDGET_MB})",
    )
    serve.add_argument("--threads", type=int, default=None, help="threads per model (all cores)")
    serve.add_argument("--no-warmup", action="store_true", help="skip the warm-up generation")
    serve.add_argument(
        "--no-advertise", action="store_true", help="do not advertise over mDNS (zeroconf)"
    )
    serve.add_argument(
        "--advertise-address",
        action="append",
        default=None,
        help="address to advertise (default: the host's addresses)",
    )
    serve.add_argument(
        "--supervisor-discovery",
        action="store_true",
        help="inside the Home Assistant add-on: announce this worker through the Supervisor",
    )
    serve.add_argument(
        "--discovery-host",
        default=socket.gethostname(),
        help="host name Home Assistant uses to reach the add-on (default: %(default)s)",
    )
    serve.add_argument(
        "--plain-http",
        action="store_true",
        help="serve plain, unencrypted HTTP instead of HTTPS (only on a network you trust)",
    )
    limits = ConnectionLimits()
    serve.add_argument(
        "--header-timeout",
        type=float,
        default=limits.header_timeout_s,
        help="seconds a new connection has for its TLS handshake and first request's headers "
        "(default: %(default)s)",
    )
    serve.add_argument(
        "--keepalive-timeout",
        type=float,
        default=limits.keepalive_timeout_s,
        help="seconds an idle connection is kept open (default: %(default)s)",
    )
    serve.add_argument(
        "--max-connections",
        type=int,
        default=limits.max_connections,
        help="connections held at once, in total (default: %(default)s)",
    )
    serve.add_argument(
        "--max-connections-per-client",
        type=int,
        default=limits.max_per_client,
        help="connections held at once from one address (default: %(default)s)",
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])

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


def _limits(args: argparse.Namespace) -> ConnectionLimits:
    try:
        return ConnectionLimits(
            header_timeout_s=args.header_timeout,
            keepalive_timeout_s=args.keepalive_timeout,
            max_connections=args.max_connections,
            max_per_client=args.max_connections_per_client,
        )
    except ValueError as err:
        raise BindError(f"bad connection limits: {err}") from err


async def _serve(args: argparse.Namespace, auth: AuthStore) -> None:
    limits = _limits(args)
    # Bound (not yet listening) before anything slow: a taken port is reported at once.
    sock = bind(args.host, args.port)
    cert = None if args.plain_http else _certificate(auth)
    models_dir = args.models_dir or default_models_dir(args.state_dir)
    options = WorkerOptions(
        model_dirs=args.models,
        state_dir=args.state_dir,
        models_dir=models_dir,
        name=args.name,
        max_running=args.max_running,
        max_queued=args.max_queued,
        prompt_cache_mb=args.prompt_cache_mb,
        threads=args.threads,
        warmup=not args.no_warmup,
        fingerprint=cert.fingerprint if cert else b"",
    )
    worker = Worker(options, auth)
    await asyncio.get_running_loop().run_in_executor(None, worker.load_models)
    runner = web.AppRunner(
        worker.build_app(),
        handler_cancellation=True,
        access_log=None,
        keepalive_timeout=limits.keepalive_timeout_s,
    )
    await runner.setup()
    if not args.supervisor_discovery and not auth.paired:
        _show_code(auth)  # before listening: a client that sees us can pair at once
        print("Enter it in Home Assistant when it offers to add this Hearth worker.", flush=True)
    assert runner.server is not None
    listener = Listener(
        sock,
        runner.server,
        ssl_context=cert.server_context() if cert else None,
        limits=limits,
    )
    listener.start()
    worker.jobs.pull_missing(args.pulls)  # beside what it serves already
    port = listener.port  # the real port when --port 0 asked for any free one
    scheme = "https" if cert else "http"
    _LOGGER.info("Hearth worker %s listening on %s://%s:%d", __version__, scheme, args.host, port)
    if cert:
        _LOGGER.info(
            "TLS certificate %s, SHA-256 fingerprint %s", cert.cert_path, cert.fingerprint_display
        )
    else:
        _LOGGER.warning("Serving plain HTTP (--plain-http): tokens and requests are not encrypted")

    advertiser: Advertiser | None = None
    if not args.no_advertise:
        advertiser = Advertiser(
            node_id=worker.node_id,
            name=args.name,
            port=port,
            version=__version__,
            api_version=API_VERSION,
            paired=auth.paired,
            addresses=args.advertise_address,
            scheme=scheme,
        )
        await advertiser.start()
        worker.on_paired.append(lambda: advertiser.update(paired=True))

    session: ClientSession | None = None
    discovery_uuid: str | None = None
    supervisor_url = os.environ.get("SUPERVISOR_URL", "http://supervisor")
    if args.supervisor_discovery:
        session = ClientSession()
        for token_info in auth.list_tokens():
            if token_info.name == SUPERVISOR_TOKEN_NAME:
                auth.revoke(token_info.token_id)
        token, _ = auth.create_token(SUPERVISOR_TOKEN_NAME, admin=True)
        discovery_uuid = await announce(
            session,
            config={
                "host": args.discovery_host,
                "port": port,
                "token": token,
                "node_id": worker.node_id,
                # The Supervisor channel is trusted: Home Assistant pins this fingerprint.
                "scheme": scheme,
                **({"fingerprint": cert.fingerprint_hex} if cert else {}),
            },
            supervisor_url=supervisor_url,
            supervisor_token=os.environ.get("SUPERVISOR_TOKEN", ""),
        )
        _LOGGER.info("Announced to Home Assistant through the Supervisor")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    _LOGGER.info("Stopping")
    if advertiser:
        await advertiser.stop()
    if session:
        if discovery_uuid:
            await withdraw(
                session,
                uuid=discovery_uuid,
                supervisor_url=supervisor_url,
                supervisor_token=os.environ.get("SUPERVISOR_TOKEN", ""),
            )
        await session.close()
    await listener.close()
    await runner.cleanup()


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
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(_serve(args, auth))
    except ManifestError as err:
        print(f"hearth-worker: {err}", file=sys.stderr)
        return 2
    except BindError as err:
        print(f"hearth-worker: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
