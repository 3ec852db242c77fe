"""Who may reach the web UI. Bound to a loopback address it answers only requests whose Host header names
this machine's loopback (localhost, 127.0.0.1, [::1]): a page on another site that rebinds its own DNS name
to 127.0.0.1 reaches the socket, but its requests carry that site's name and get a 403 (DNS rebinding).
Bound to any other address it requires a login (--auth), as the app can start training runs and read every
file under --root, and answers only the names it was told (--allowed-host) besides the bound address."""

from __future__ import annotations

import ipaddress
import os
import re

from lmforge.config.errors import ConfigError

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
AUTH_VARIABLE = "LMFORGE_WEBUI_AUTH"
_NAME = re.compile(r"[a-z0-9.\-]+|\[[0-9a-f:.]+\]")


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def login(auth: str | None) -> tuple[str, str] | None:
    """(user, password) from --auth or $LMFORGE_WEBUI_AUTH (kept out of `ps` listings); None for no login."""
    auth = auth if auth is not None else os.environ.get(AUTH_VARIABLE) or None
    if auth is None:
        return None
    user, sep, password = auth.partition(":")
    if not sep or not user or not password:
        raise ConfigError(f"--auth (or ${AUTH_VARIABLE}) must be USER:PASSWORD, both non-empty")
    return user, password


def check_exposure(host: str, credentials: tuple[str, str] | None) -> None:
    """Refuse to listen beyond this machine without a login: anyone who reaches the port could train,
    read the served folder and (with --allow-remote-code) run code."""
    if not is_loopback(host) and credentials is None:
        raise ConfigError(f"--host {host} makes the web UI reachable from other machines: add --auth USER:PASSWORD "
                          f"(or set ${AUTH_VARIABLE}), and put it behind a TLS proxy (see docs/webui.md)")


def allowed_names(host: str, extra: list[str] | None = None) -> frozenset[str]:
    """The Host names answered: loopback names always (the app's own start-up probe uses them), the bound
    address unless it is a wildcard, and the names given with --allowed-host."""
    names = set(LOOPBACK_NAMES)
    if host not in ("0.0.0.0", "::", ""):
        names.add(host.lower().strip("[]"))
    for name in extra or []:
        name = name.strip().lower().strip("[]")
        if not name or not _NAME.fullmatch(name):
            raise ConfigError(f"--allowed-host {name!r}: a host name or address, without port or scheme")
        names.add(name)
    return frozenset(names)


def host_name(header: bytes) -> str | None:
    """The name in a Host header (`name`, `name:port`, `[v6]:port`), lower-cased; None if malformed."""
    text = header.decode("latin-1").strip().lower()
    match = re.fullmatch(r"(\[[0-9a-f:.]+\]|[a-z0-9.\-]+)(?::\d{1,5})?", text)
    return match.group(1).strip("[]") if match else None


class HostGuard:
    """ASGI middleware: a request (or websocket) whose Host is not one of `allowed` gets a 403, unread."""

    def __init__(self, app, allowed: frozenset[str]):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        hosts = [value for key, value in scope.get("headers", []) if key == b"host"]
        name = host_name(hosts[0]) if len(hosts) == 1 else None
        if name in self.allowed:
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = (b"Host header not accepted by this lmforge web UI (start it with --allowed-host NAME "
                b"to answer another name)\n")
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
