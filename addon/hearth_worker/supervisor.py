"""Add-on only: tell Home Assistant about this worker through Supervisor discovery.

The Supervisor's API (``supervisor/api/discovery.py``): ``POST /discovery`` with
``{"service": ..., "config": {...}}`` answers ``{"result": "ok", "data": {"uuid": ...}}``;
``DELETE /discovery/{uuid}`` withdraws the message. Errors come back as
``{"result": "error", "message": ...}`` with a 4xx status. The add-on authenticates with
the ``SUPERVISOR_TOKEN`` it is given, as a bearer token. The service name must be listed
under ``discovery:`` in the add-on's ``config.yaml``.

The config is shown to Home Assistant (and stored in its config entry flow), so it must
never hold a secret.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import quote

import aiohttp

_LOGGER = logging.getLogger(__name__)

SERVICE = "hearth"
DEFAULT_SUPERVISOR_URL = "http://supervisor"
_TIMEOUT = aiohttp.ClientTimeout(total=10)


class SupervisorError(Exception):
    """The Supervisor refused a discovery request, or could not be reached."""


def _headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _call(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    token: str,
    what: str,
    json: dict[str, Any] | None = None,
) -> tuple[int, dict[str, Any] | None]:
    """Make one request; returns (status, parsed body or None when not JSON)."""
    try:
        async with session.request(
            method, url, json=json, headers=_headers(token), timeout=_TIMEOUT
        ) as response:
            status = response.status
            try:
                body = await response.json(content_type=None)
            except ValueError:
                body = None
    except (aiohttp.ClientError, TimeoutError) as err:
        raise SupervisorError(f"{what}: cannot reach the Supervisor: {err!r}") from err
    return status, body if isinstance(body, dict) else None


def _failure(what: str, status: int, body: dict[str, Any] | None) -> SupervisorError:
    message = body.get("message") if body else None
    detail = f": {message}" if message else ""
    return SupervisorError(f"{what} failed (HTTP {status}){detail}")


async def announce(
    session: aiohttp.ClientSession,
    *,
    config: dict[str, Any],
    supervisor_url: str = DEFAULT_SUPERVISOR_URL,
    supervisor_token: str,
) -> str:
    """Send a ``hearth`` discovery message; returns its uuid (keep it to withdraw)."""
    what = "Supervisor discovery announce"
    status, body = await _call(
        session,
        "POST",
        f"{supervisor_url.rstrip('/')}/discovery",
        token=supervisor_token,
        what=what,
        json={"service": SERVICE, "config": config},
    )
    if status >= 300 or body is None or body.get("result") != "ok":
        raise _failure(what, status, body)
    data = body.get("data")
    uuid = data.get("uuid") if isinstance(data, dict) else None
    if not isinstance(uuid, str) or not uuid:
        raise SupervisorError(f"{what}: the answer holds no discovery uuid")
    _LOGGER.debug("Announced to Home Assistant through the Supervisor (discovery %s)", uuid)
    return uuid


async def withdraw(
    session: aiohttp.ClientSession,
    *,
    uuid: str,
    supervisor_url: str = DEFAULT_SUPERVISOR_URL,
    supervisor_token: str,
) -> None:
    """Remove a discovery message. One the Supervisor no longer knows (404) is gone already."""
    what = "Supervisor discovery withdraw"
    status, body = await _call(
        session,
        "DELETE",
        f"{supervisor_url.rstrip('/')}/discovery/{quote(uuid, safe='')}",
        token=supervisor_token,
        what=what,
    )
    if status == 404:
        _LOGGER.debug("Discovery %s was already gone", uuid)
        return
    if status >= 300 or (body is not None and body.get("result") != "ok"):
        raise _failure(what, status, body)
