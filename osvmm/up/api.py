"""The control API's routes: each one's method, path, body and query fields, and
its handler; the checks every request passes before a handler sees it; the
HTTP status of each error (docs/api.md, docs/openapi.yaml).

A ``Route`` names its operation as docs/openapi.yaml does (``operationId``);
tests/test_api_openapi.py checks that the routes served and the document's
are the same set. A handler takes one dict, ``msg``: the path's ``name`` (when
it has one), the body's fields and the query's, each already checked against
the route's tables, and returns the JSON object to answer (or ``Raw``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import unquote

from osvmm.errors import (
    ConfigError,
    ControlError,
    GuestMemoryError,
    ImageError,
    NoSuchPartition,
    OsvmmError,
    VmmBug,
    WrongState,
)

API_VERSION = 1
MAX_NAME = 64  # a partition name is at most 32 characters (docs/config.md)

# A field table: field -> (JSON types allowed, required).
Fields = dict[str, tuple[tuple[type, ...], bool]]
NAME: tuple[tuple[type, ...], bool] = ((str,), True)


@dataclass(frozen=True)
class Raw:
    """An answer that is not JSON (``/metrics``)."""

    content_type: str
    body: bytes


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # a template: "/v1/partitions/{name}/start"
    operation: str  # its operationId in docs/openapi.yaml
    handler: Callable[[dict], object] | None = None  # None: the server serves it itself
    body: Fields = field(default_factory=dict)
    query: dict[str, type] = field(default_factory=dict)  # name -> int or str
    # The path's segments, split once: ``match`` reads them for every request.
    segments: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "segments", tuple(self.path.strip("/").split("/")))


class ApiError(ControlError):
    """A request refused with an HTTP status (``status``) and a one-line message."""

    def __init__(self, status: int, message: str, allow: str | None = None):
        self.status = status
        self.allow = allow
        super().__init__(message)


def status_of(err: OsvmmError) -> int:
    """The HTTP status of an error a handler raised."""
    if isinstance(err, ApiError):
        return err.status
    if isinstance(err, NoSuchPartition):
        return 404
    if isinstance(err, WrongState):
        return 409
    if isinstance(err, VmmBug):
        return 500
    if isinstance(err, ControlError | ConfigError | GuestMemoryError | ImageError):
        return 400
    return 500  # the VMM or the host failed it: KVM, a snapshot's disk, a migration's peer


_JSON_TYPES = {
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "true or false",
    list: "an array",
    dict: "an object",
    type(None): "null",
}


def _json_type(value) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _short(text: str, limit: int = 40) -> str:
    r = repr(text)
    return r if len(r) <= limit else r[: limit - 4] + "...'"


def match(routes: list[Route], method: str, path: str) -> tuple[Route, dict]:
    """The route serving ``method path`` and the path's parameters; ApiError 404
    (no such path), 405 (the path, not with this method: ``allow`` lists them)."""
    raw = path.strip("/").split("/") if path != "/" else [""]
    allowed = []
    for route in routes:
        segs = route.segments
        if len(segs) != len(raw):
            continue
        params = {}
        for tmpl, seg in zip(segs, raw, strict=True):
            if tmpl.startswith("{"):
                if not seg:
                    break
                params[tmpl[1:-1]] = seg
            elif tmpl != seg:
                break
        else:
            if route.method == method:
                return route, params
            allowed.append(route.method)
    if allowed:
        raise ApiError(
            405,
            f"{path} takes {' or '.join(allowed)}, not {_short(method, 20)}",
            ", ".join(allowed),
        )
    raise ApiError(404, f"no route {_short(path, 60)} (docs/openapi.yaml lists them)")


def check(route: Route, params: dict, body: bytes, query: str) -> dict:
    """The handler's ``msg``: the path's name, the body's and the query's fields,
    each checked against the route's tables; ApiError 400 for anything else."""
    op = route.operation
    msg: dict = {}
    if "name" in params:
        try:
            name = unquote(params["name"], errors="strict")
        except UnicodeDecodeError:
            raise ApiError(400, f"{op}: a partition name is UTF-8") from None
        if len(name) > MAX_NAME:
            raise ApiError(400, f"{op}: name {_short(name)} is longer than {MAX_NAME} characters")
        msg["name"] = name
    if body.strip():
        try:
            fields = json.loads(body)
        except (ValueError, RecursionError):  # bad JSON or UTF-8, too deep, too many digits
            fields = None
        if not isinstance(fields, dict):
            raise ApiError(400, f"{op}: a request body is one JSON object")
        for key, value in fields.items():
            if key not in route.body:
                known = ", ".join(route.body) or "none"
                raise ApiError(400, f"{op}: unknown field {_short(key)} (fields: {known})")
            types, _ = route.body[key]
            if type(value) not in types:
                want = " or ".join(dict.fromkeys(_JSON_TYPES[t] for t in types))
                raise ApiError(400, f"{op}: {key} must be {want}, not {_json_type(value)}")
            msg[key] = value
    for key, (_, required) in route.body.items():
        if required and key not in msg:
            raise ApiError(400, f"{op}: needs {key}")
    if query:
        for pair in query.split("&"):
            key, _, value = pair.partition("=")
            key = unquote(key)
            kind = route.query.get(key)
            if kind is None:
                known = ", ".join(route.query) or "none"
                raise ApiError(400, f"{op}: unknown parameter {_short(key)} (parameters: {known})")
            value = unquote(value)
            if kind is int:
                if not (value.isascii() and value.lstrip("-").isdigit()) or len(value) > 18:
                    raise ApiError(400, f"{op}: {key} must be a whole number, not {_short(value)}")
                msg[key] = int(value)
            else:
                msg[key] = value
    return msg
