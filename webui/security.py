"""The guard in front of every route of our app: checks that need no route and must come before the body.

One ASGI middleware (:class:`Guard`), on our FastAPI app under the CORS layer, answers in JSON before any
route (API or the Gradio UI) sees the request:

- **Host** (with --listen/--server-name): the ``Host`` header must name this machine, loopback, or a name of
  ``--allowed-hosts``; else 400 (a page on another site cannot reach the server through DNS rebinding).
- **Cross-site "simple" requests**: a POST/PUT/PATCH/DELETE without a body or with a form body (the kinds a
  browser sends from any page without asking CORS first) whose ``Origin``/``Referer`` is another site and
  not allowed by ``--cors-allow-origins``/``--cors-allow-origins-regex`` gets 403.
- **Body size** (``--max-body-size`` MiB): a ``Content-Length`` above it gets 413 at once; a body that grows
  past it while it is read (chunked) gets 413 too, before anything parses it.
- **API login**: on the API's paths, credentials (HTTP Basic of ``--api-auth``, or the UI's logins and
  session cookie when only --gradio-auth is set) are checked before the body is read: 401.
- **Failed logins** (API credentials and the UI's ``/login``) are counted per client address: after
  :data:`FAILURES_ALLOWED` in :data:`FAILURE_WINDOW_S` seconds the client gets 429 with ``Retry-After``.
"""

from __future__ import annotations

import base64
import binascii
import contextvars
import hashlib
import json
import re
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from starlette.exceptions import HTTPException

from webui.flags import Flags

MIB = 1024 * 1024
#: Failed logins a client may make per window before it gets 429.
FAILURES_ALLOWED = 10
FAILURE_WINDOW_S = 60.0
#: First path segments of the API (its docs and schema included); extension routes add theirs.
API_PREFIXES = ("/sdapi", "/controlnet", "/internal", "/docs", "/docs-assets", "/openapi.json")
STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}
#: Bodies a browser sends cross-site without a CORS preflight.
SIMPLE_TYPES = {"", "application/x-www-form-urlencoded", "multipart/form-data", "text/plain"}
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


#: True while the guard serves a request without a live UI session on a server with a UI login.
_ANONYMOUS: contextvars.ContextVar[bool] = contextvars.ContextVar("ui_anonymous", default=False)
_NO_API_INFO: dict = {"named_endpoints": {}, "unnamed_endpoints": {}}


class _ApiInfoAfterLogin(dict):
    """Gradio's cache of the page's API description (which lists every dropdown's choices: checkpoint, VAE
    and upscaler names), answering an empty description while the request has no UI session."""

    def __getitem__(self, key):
        return _NO_API_INFO if _ANONYMOUS.get() else super().__getitem__(key)


def hide_api_info_before_login(gradio_app) -> None:
    """With a UI login, the login page Gradio serves carries no API description: its dropdown choices
    would name the models. (Gradio's own ``/gradio_api/info`` already needs the login; the description of
    all endpoints, which Gradio caches for every caller, is left empty.)"""
    gradio_app.page_api_info = _ApiInfoAfterLogin(gradio_app.page_api_info)
    gradio_app.api_info = dict(_NO_API_INFO)
    gradio_app.all_app_info = dict(_NO_API_INFO)


class BodyTooLarge(HTTPException):
    """The request body grew past the limit while it was read (an HTTP error, so that a route's body parser
    passes it on as the 413 it is instead of a "could not parse" 400)."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body is more than the limit of {limit} bytes (--max-body-size "
                              f"{limit // MIB})")


class FailureCounter:
    """Failed logins per client address in a sliding window.

    Only distinct wrong credentials count: a client that repeats one stale password (a script polling with
    an old setting) is answered 401 each time without being locked out; one that guesses is.
    """

    def __init__(self, allowed: int = FAILURES_ALLOWED, window: float = FAILURE_WINDOW_S):
        self.allowed, self.window = allowed, window
        self._failures: dict[str, deque[tuple[float, object]]] = {}
        self._lock = threading.Lock()

    def _recent(self, client: str, now: float) -> deque[tuple[float, object]]:
        times = self._failures.setdefault(client, deque())
        while times and times[0][0] <= now - self.window:
            times.popleft()
        return times

    def retry_after(self, client: str) -> int:
        """Seconds the client must wait before it may try again (0: it may try now)."""
        now = time.monotonic()
        with self._lock:
            times = self._recent(client, now)
            if len({key for _, key in times}) < self.allowed:
                return 0
            return max(1, int(times[0][0] + self.window - now + 0.999))

    def failed(self, client: str, key: object = None) -> None:
        """Count a failure of ``client``; ``key`` names the credentials tried (None: always a new guess)."""
        now = time.monotonic()
        with self._lock:
            times = self._recent(client, now)
            key = object() if key is None else key
            times.append((now, key))
            if len(self._failures) > 10000:  # forget clients whose failures are all old
                for name in [k for k, v in self._failures.items() if not v or v[-1][0] <= now - self.window]:
                    del self._failures[name]


def machine_names(bound: str | None = None) -> set[str]:
    """This machine's host names and addresses (lower case), loopback, and the bound name."""
    names = set(LOOPBACK_NAMES)
    for name in (socket.gethostname(), socket.getfqdn(), bound or ""):
        if name and name not in ("0.0.0.0", "::"):
            names.add(name.lower())
    try:
        import psutil

        for addresses in psutil.net_if_addrs().values():
            names.update(a.address.split("%")[0].lower() for a in addresses
                         if a.family in (socket.AF_INET, socket.AF_INET6))
    except Exception:  # psutil missing or the interfaces unreadable: fall back to the name's addresses
        pass
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None):
            names.add(str(info[4][0]).lower())
    except OSError:
        pass
    return names


def host_of(value: str) -> str:
    """``"Example.com:7860"`` -> ``"example.com"``; ``"[::1]:7860"`` -> ``"::1"``."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    if value.count(":") > 1:  # a bare IPv6 address
        return value
    return value.partition(":")[0]


def host_allowed(host: str, allowed: Iterable[str]) -> bool:
    """True when ``host`` is one of ``allowed``; an entry ``*.example.com`` allows every sub-domain."""
    for name in allowed:
        if name.startswith("*.") and (host.endswith(name[1:]) or host == name[2:]):
            return True
        if host == name:
            return True
    return False


def parse_basic(header: str) -> tuple[bytes, bytes] | None:
    """``Basic base64(user:password)`` -> (user, password), or None."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, colon, password = decoded.partition(b":")
    return (user, password) if colon else None


def credentials_match(given: tuple[bytes, bytes] | None, allowed: list[tuple[bytes, bytes]]) -> bool:
    """Constant-time check against every allowed pair (timing tells nothing about which part was wrong)."""
    if given is None:
        return False
    ok = False
    for user, password in allowed:
        ok |= secrets.compare_digest(given[0], user) & secrets.compare_digest(given[1], password)
    return ok


@dataclass
class Policy:
    """What the guard checks; built from the flags, completed once the API and the UI are mounted."""

    max_body_bytes: int = 64 * MIB
    #: None: any Host (loopback only binding); else the names the Host header may carry.
    allowed_hosts: set[str] | None = None
    cors_origins: set[str] = field(default_factory=set)
    cors_regex: re.Pattern | None = None
    #: Origins allowed besides our own (``*.gradio.live`` with --share).
    trusted_origin_hosts: set[str] = field(default_factory=set)
    #: API credentials: None = the API is open.
    api_credentials: list[tuple[bytes, bytes]] | None = None
    #: With the UI's logins on the API: True when the request's cookies hold a live UI session.
    ui_session: Callable[[dict[str, str]], bool] | None = None
    api_prefixes: set[str] = field(default_factory=lambda: set(API_PREFIXES))
    #: With a UI login: True when the request's cookies hold a live UI session.
    ui_logged_in: Callable[[dict[str, str]], bool] | None = None
    #: The UI's login route (Gradio's), whose failures are counted.
    login_paths: tuple[str, ...] = ()
    failures: FailureCounter = field(default_factory=FailureCounter)

    @classmethod
    def from_flags(cls, flags: Flags) -> Policy:
        from webui.cors import cors_origins

        allowed_hosts = None
        extra = {name.strip().lower() for name in (flags.allowed_hosts or "").split(",") if name.strip()}
        if flags.listen or (flags.server_name and flags.server_name not in LOOPBACK_NAMES):
            allowed_hosts = machine_names(flags.server_name) | extra
            if flags.share:
                allowed_hosts.add("*.gradio.live")
        return cls(max_body_bytes=flags.max_body_size * MIB, allowed_hosts=allowed_hosts,
                   cors_origins=set(cors_origins(flags)),
                   cors_regex=re.compile(flags.cors_allow_origins_regex) if flags.cors_allow_origins_regex else None,
                   trusted_origin_hosts={"*.gradio.live"} if flags.share else set())

    def is_api_path(self, path: str) -> bool:
        first = "/" + path.lstrip("/").partition("/")[0]
        return first in self.api_prefixes

    def origin_allowed(self, origin: str, host_header: str) -> bool:
        """True for our own origin (its host:port is the Host header) and the origins CORS allows."""
        parts = urlsplit(origin)
        if parts.netloc and parts.netloc.lower() == host_header.lower():
            return True
        origin = origin.rstrip("/")
        if origin in self.cors_origins or "*" in self.cors_origins:
            return True
        if self.cors_regex is not None and self.cors_regex.fullmatch(origin):
            return True
        return bool(parts.hostname) and host_allowed(parts.hostname or "", self.trusted_origin_hosts)


def _headers(scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def _cookies(header: str) -> dict[str, str]:
    cookies = {}
    for part in header.split(";"):
        name, eq, value = part.strip().partition("=")
        if eq:
            cookies[name] = value
    return cookies


async def _answer(send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """The ASGI middleware of this module (see the module's text for what it checks, in that order)."""

    def __init__(self, app, policy: Policy):
        self.app = app
        self.policy = policy

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        policy = self.policy
        headers = _headers(scope)
        host_header = headers.get("host", "")
        if policy.allowed_hosts is not None and not host_allowed(host_of(host_header), policy.allowed_hosts):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            await _answer(send, 400, f"Host {host_header!r} is not a name of this server; add it with "
                                     "--allowed-hosts")
            return
        if policy.ui_logged_in is not None:
            _ANONYMOUS.set(not policy.ui_logged_in(_cookies(headers.get("cookie", ""))))
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        client = (scope.get("client") or ("?", 0))[0]
        if method in STATE_CHANGING:
            origin = headers.get("origin") or headers.get("referer", "")
            kind = headers.get("content-type", "").partition(";")[0].strip().lower()
            if origin and origin != "null" and kind in SIMPLE_TYPES and not policy.origin_allowed(origin, host_header):
                await _answer(send, 403, f"cross-site request from {origin[:200]!r} refused: that origin is not "
                                         "allowed with --cors-allow-origins")
                return
            if origin == "null" and kind in SIMPLE_TYPES:
                await _answer(send, 403, "cross-site request from an opaque origin refused")
                return
        if policy.is_api_path(path) and (policy.api_credentials is not None or policy.ui_session is not None):
            wait = policy.failures.retry_after(client)
            if wait:
                await _answer(send, 429, f"too many failed logins from {client}; try again in {wait} s",
                              {"Retry-After": str(wait)})
                return
            given = parse_basic(headers.get("authorization", ""))
            ok = credentials_match(given, policy.api_credentials or [])
            if not ok and policy.ui_session is not None:
                ok = policy.ui_session(_cookies(headers.get("cookie", "")))
            if not ok:
                if given is not None:
                    policy.failures.failed(client, hashlib.sha256(b"\0".join(given)).digest())
                await _answer(send, 401, "Incorrect username or password", {"WWW-Authenticate": "Basic"})
                return
        length = headers.get("content-length", "")
        limit = policy.max_body_bytes
        if length.isdigit() and int(length) > limit:
            await _answer(send, 413, f"request body is {int(length)} bytes, more than the limit of {limit} bytes "
                                     f"(--max-body-size {limit // MIB})")
            return
        login = method == "POST" and path in policy.login_paths
        if login:
            wait = policy.failures.retry_after(client)
            if wait:
                await _answer(send, 429, f"too many failed logins from {client}; try again in {wait} s",
                              {"Retry-After": str(wait)})
                return
        received = 0
        started = False

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def watched_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if login and message["status"] in (400, 401, 403):
                    policy.failures.failed(client)
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except BodyTooLarge as error:
            if not started:
                await _answer(send, 413, str(error.detail))
