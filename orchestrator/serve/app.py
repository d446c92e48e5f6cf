"""The ASGI application of ``buildsmart serve`` (Starlette): the Project Haystack HTTP API under
``/api``, the dashboard under ``/ui``, ``/metrics`` and ``POST /ingest``, one login for all.

Haystack ops (docHaystack/Ops): about, ops, formats, read (filter or ids), nav, hisRead, hisWrite,
close. Requests are GET with query parameters or POST with a grid in Zinc or JSON (by
Content-Type); answers are Zinc or JSON by Accept (Zinc when the client does not say). A request
the server cannot serve gets Haystack's error grid (HTTP 200, meta ``err``), as clients expect;
authentication failures are HTTP 401/403.

Database work is blocking psycopg on Starlette's thread pool, through two small connection pools:
the application role for data, the orchestrator role for users (which live in the catalog).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import psycopg
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from psycopg_pool import ConnectionPool
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orchestrator import topology
from orchestrator.connections import app_target, superuser_target
from orchestrator.exceptions import BuildSmartError, InputError, InputLocation
from orchestrator.ingest.parse import Parsed, ReadingBatch, parser_for
from orchestrator.serve import auth, dashboard, hayson, history, ids, ranges, scram, tz, users, zinc
from orchestrator.serve import filter as hfilter
from orchestrator.serve.intake import Intake
from orchestrator.serve.kinds import EMPTY, Col, Grid, His, Number, Ref, Uri, error_grid
from orchestrator.serve.metrics import Metrics
from orchestrator.serve.records import UNIT, Records
from orchestrator.serve.snapshot import StatusPoller

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
COOKIE = "bsdb_session"
MAX_BODY = 64 << 20
VERSION = "0.1.0"
OPS = (
    ("about", "Summary information for the server"),
    ("close", "Close the session (revokes the bearer token)"),
    ("ops", "Operations supported by the server"),
    ("formats", "Grid formats supported by the server"),
    ("read", "Read records by filter or by ids"),
    ("nav", "Navigate sites and their points"),
    ("hisRead", "Read the history of a point"),
    ("hisWrite", "Write history to a point (readings, latest value wins)"),
)


@dataclass(frozen=True)
class ServeOptions:
    directory: Path
    status_interval: float = 2.0
    pool_size: int = 8
    metrics_public: bool = False


class Server:
    """Everything one serving process holds: pools, the login, the status poller, the intake."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        directory = options.directory.resolve()
        topo, creds = topology.load(directory), topology.load_credentials(directory)
        self.data = ConnectionPool(
            app_target(topo.coordinator, creds).conninfo("serve"), min_size=1, max_size=options.pool_size, open=False,
            kwargs={"autocommit": True}, name="serve-data",
        )  # fmt: skip
        self.admin = ConnectionPool(
            superuser_target(topo.coordinator, creds).conninfo("serve-users"), min_size=1, max_size=2, open=False,
            kwargs={"autocommit": True}, name="serve-users",
        )  # fmt: skip
        self.records = Records(self.data)
        self.auth = auth.Authenticator(self._lookup)
        self.poller = StatusPoller(directory, options.status_interval)
        self.metrics = Metrics(self.poller)
        self.intake = Intake(directory)
        self.started = datetime.now(UTC)

    def _lookup(self, name: str) -> tuple[users.User, scram.Credentials] | None:
        with self.admin.connection() as conn:
            return users.lookup(conn, name)

    def open(self) -> None:
        self.data.open()
        self.admin.open()
        self.poller.start()
        log.info("serving %s", self.options.directory)

    def close(self) -> None:
        self.poller.stop()
        self.intake.close()
        self.data.close()
        self.admin.close()


# ---------------------------------------------------------------- encoding


def _wants_json(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return "application/json" in accept and "text/zinc" not in accept.split("application/json")[0]


def grid_response(request: Request, grid: Grid | His, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    if _wants_json(request):
        text = hayson.encode_his(grid) if isinstance(grid, His) else hayson.encode_grid(grid)
        return Response(text, status, headers, media_type=hayson.MEDIA_TYPE)
    text = zinc.encode_his(grid) if isinstance(grid, His) else zinc.encode_grid(grid)
    return Response(text, status, headers, media_type=f"{zinc.MEDIA_TYPE}; charset=utf-8")


async def request_grid(request: Request) -> Grid:
    """The request's grid: POST body (Zinc or JSON) or GET query parameters (one row)."""
    if request.method == "GET":
        row: dict[str, Any] = {}
        for key, value in request.query_params.items():
            if key in ("id", "navId"):
                row[key] = Ref(value.removeprefix("@"))
            elif key == "limit":
                try:
                    row[key] = Number(float(value))
                except ValueError as exc:
                    raise InputError(InputLocation("query", 1), f"limit {value!r} is not a number") from exc
            else:
                row[key] = value
        return Grid.of([row] if row else [])
    body = await request.body()
    if len(body) > MAX_BODY:
        raise InputError(InputLocation("request", 1), f"request body over {MAX_BODY >> 20} MB")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(InputLocation("request", 1), f"request body is not UTF-8 (byte {exc.start})") from exc
    if not text.strip():
        return EMPTY
    ctype = request.headers.get("content-type", "")
    if "json" in ctype or (not ctype.startswith("text/zinc") and text.lstrip().startswith("{")):
        return hayson.decode_grid(text)
    return zinc.decode_grid(text)


# ---------------------------------------------------------------- who is asking


def _bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, attrs = scram.parse_header(header) if header else ("", {})
    if scheme == "BEARER" and attrs.get("authToken"):
        return attrs["authToken"]
    return request.cookies.get(COOKIE)


def current_user(server: Server, request: Request) -> users.User | None:
    token = _bearer_token(request)
    return server.auth.bearer(token) if token else None


async def basic_user(server: Server, request: Request) -> users.User | None:
    header = request.headers.get("authorization", "")
    if not header.lower().startswith("basic "):
        return None
    try:
        name, _, password = scram.unb64(header[6:]).decode("utf-8").partition(":")
    except (scram.AuthFailed, UnicodeDecodeError):
        return None
    return await run_in_threadpool(server.auth.password, name, password)


def _unauthorized(request: Request) -> Response:
    return PlainTextResponse(
        "authentication required: Haystack clients log in on /api/about (SCRAM); browsers on /ui/login",
        401,
        headers={"WWW-Authenticate": "HELLO"},
    )


# ---------------------------------------------------------------- Haystack ops


def _about(server: Server) -> Grid:
    now = datetime.now(UTC)
    return Grid.of(
        [
            {
                "haystackVersion": "4.0",
                "tz": "UTC",
                "serverName": "BuildSmartDB",
                "serverTime": now,
                "serverBootTime": server.started,
                "productName": "BuildSmartDB",
                "productVersion": VERSION,
                "productUri": Uri("https://github.com/"),
                "vendorName": "BuildSmartDB",
                "moduleName": "orchestrator.serve",
                "moduleVersion": VERSION,
            }
        ]
    )


def _ref_of(value: Any, what: str) -> str:
    if isinstance(value, Ref):
        return value.val
    if isinstance(value, str):
        return value.removeprefix("@")
    raise InputError(InputLocation("request", 1), f"{what} must be a ref, not {type(value).__name__}")


def op_read(server: Server, grid: Grid) -> Grid:
    if not grid.rows:
        raise InputError(InputLocation("request", 1), "read needs a filter or ids")
    first = grid.rows[0]
    if "filter" in first:
        text = first["filter"]
        if not isinstance(text, str):
            raise InputError(InputLocation("request", 1), "filter must be a string")
        limit = first.get("limit")
        n = int(limit.val) if isinstance(limit, Number) and limit.val > 0 else None
        rows = server.records.read_filter(hfilter.parse(text), n)
        return Grid.of(rows, cols=["id"] if rows else ())
    wanted = [_ref_of(r.get("id"), "id") for r in grid.rows]
    return Grid.of(server.records.read_ids(wanted), cols=["id"])


def op_nav(server: Server, grid: Grid) -> Grid:
    nav = grid.rows[0].get("navId") if grid.rows else None
    rows = server.records.nav(None if nav is None else _ref_of(nav, "navId"))
    return Grid.of(rows, cols=["id", "dis"] if rows else ())


def _point(server: Server, ref: str) -> tuple[ids.PointKey, Any]:
    key = ids.parse_point(ref)
    if key is None:
        raise InputError(InputLocation("request", 1), f"@{ref} is not a meter point (ids look like @pt:<building>:<meter>)")
    return key, server.records.catalogue().building(key.building)


def op_his_read(server: Server, grid: Grid) -> Grid | His:
    if not grid.rows:
        raise InputError(InputLocation("request", 1), "hisRead needs id and range")
    range_text = grid.rows[0].get("range", grid.meta.get("range"))
    if not isinstance(range_text, str):
        raise InputError(
            InputLocation("request", 1), "hisRead needs a range (today, yesterday, a date, date,date, dateTime,dateTime)"
        )
    refs = [_ref_of(r.get("id"), "id") for r in grid.rows]
    now = datetime.now(UTC)
    if len(refs) == 1:  # the usual case: straight to text (kinds.His)
        key, building = _point(server, refs[0])
        zone = tz.zone_of_building(building.time_zone)
        span = ranges.parse(range_text, zone, now)
        texts, values = history.source_for(span).local(server.data, key, span, zone)
        end = span.end if span.end is not None else (datetime.fromisoformat(texts[-1]) if texts else span.start)
        meta = {"id": Ref(refs[0], f"{key.building} {key.meter}"), "hisStart": span.start, "hisEnd": end.astimezone(zone)}
        return His(meta, zone, UNIT, values, texts=texts)
    results = []
    for ref in refs:
        key, building = _point(server, ref)
        zone = tz.zone_of_building(building.time_zone)
        span = ranges.parse(range_text, zone, now)
        source = history.source_for(span)
        results.append((ref, key, zone, span, source, source.rows(server.data, key, span)))
    # batch read: one ts column, v0..vN (Haystack's batch hisRead)
    merged: dict[datetime, dict[str, Any]] = {}
    for i, (_, _, zone, _, _, rows) in enumerate(results):
        for ts, kwh in rows:
            merged.setdefault(ts, {"ts": ts.astimezone(zone)})[f"v{i}"] = Number(kwh, "kWh")
    cols = (Col("ts", {}), *(Col(f"v{i}", {"id": Ref(r[0])}) for i, r in enumerate(results)))
    span0 = results[0][3]
    return Grid({"ver": "3.0", "hisStart": span0.start, **({"hisEnd": span0.end} if span0.end else {})}, cols,
                tuple(merged[k] for k in sorted(merged)))  # fmt: skip


def op_his_write(server: Server, grid: Grid) -> tuple[Grid, int]:
    """Returns the answer and the rows stored."""
    targets: list[tuple[str, str]] = []  # (column, point ref)
    if "id" in grid.meta:
        targets.append(("val", _ref_of(grid.meta["id"], "id")))
    else:
        targets.extend((c.name, _ref_of(c.meta["id"], "id")) for c in grid.cols if c.name != "ts" and "id" in c.meta)
    if not targets:
        raise InputError(InputLocation("request", 1), "hisWrite needs the point's id in the grid meta (or each column's meta)")
    parsed: list[Parsed] = []
    pairs = set()
    for column, ref in targets:
        key, _ = _point(server, ref)
        pairs.add((key.building, key.meter))
        rows = [(r.get("ts"), r.get(column)) for r in grid.rows if r.get(column) is not None]
        parsed.append(history.readings_of(key, rows))
    rejects = [(t[1], r) for t, p in zip(targets, parsed, strict=True) for r in p.rejects]
    if rejects:
        first = rejects[0]
        raise InputError(
            InputLocation("request", first[1].line),
            f"{first[1].reason} (point @{first[0]}); {len(rejects)} bad row(s), nothing from this request is written",
        )
    batch = ReadingBatch.concat([p.batch for p in parsed])
    stored = server.intake.store(batch) if batch.rows else None
    server.records.add_meters(pairs)
    log.info("hisWrite: %d readings to %s", batch.rows, ", ".join(f"@{t[1]}" for t in targets))
    return EMPTY, stored.rows if stored else 0


# ---------------------------------------------------------------- HTTP ingest


def ingest_body(server: Server, body: bytes, fmt: str, skip_rejects: bool) -> dict[str, Any]:
    """CSV (header building,meter,ts,kwh) or JSON lines, checked by the file loader's parser; all or
    nothing unless ``skip_rejects`` (then the good rows load and the bad lines are listed)."""
    if fmt not in ("csv", "jsonl"):
        raise InputError(InputLocation("request", 1), f"unknown format {fmt!r}: use csv or jsonl")
    parser = parser_for("csv" if fmt == "csv" else "jsonl", "request")
    if body and not body.endswith(b"\n"):
        body += b"\n"
    parsed = parser.parse(body, 1) if body.strip() else None
    if parsed is None:
        raise InputError(
            InputLocation("request", 1), "empty body" + (": missing header building,meter,ts,kwh" if fmt == "csv" else "")
        )
    if parsed.rejects and not skip_rejects:
        bad = parsed.rejects[0]
        raise InputError(
            InputLocation("request", bad.line, bad.column),
            f"{bad.reason}; {len(parsed.rejects)} bad line(s), nothing from this request is committed "
            "(fix them, or send with rejects=skip to load the good lines)",
        )
    stored = server.intake.store(parsed.batch) if parsed.batch.rows else None
    if parsed.batch.rows:
        b = parsed.batch.building.to_pylist()
        m = parsed.batch.meter.to_pylist()
        server.records.add_meters(set(zip(b, m, strict=True)))
    return {
        "lines": parsed.lines,
        "loaded": stored.rows if stored else 0,
        "inserted": stored.inserted if stored else 0,
        "replaced": stored.replaced if stored else 0,
        "unchanged": stored.unchanged if stored else 0,
        "rejected": len(parsed.rejects),
        "rejects": [{"line": r.line, "column": r.column, "reason": r.reason} for r in parsed.rejects[:1000]],
    }


# ---------------------------------------------------------------- the application


class Timing:
    """HTTP request latency per route into /metrics (a plain ASGI middleware: no body buffering)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or ("/static" if scope["path"].startswith("/static") else "other")
            self.metrics.requests.labels(path, scope["method"], str(status["code"])).observe(time.perf_counter() - started)


def create_app(options: ServeOptions) -> Starlette:
    server = Server(options)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await run_in_threadpool(server.open)
        try:
            yield
        finally:
            await run_in_threadpool(server.close)

    async def about(request: Request) -> Response:
        header = request.headers.get("authorization", "")
        scheme = header.split(" ", 1)[0].upper() if header else ""
        if scheme in ("HELLO", "SCRAM"):
            outcome = await run_in_threadpool(server.auth.handshake, header)
            if isinstance(outcome, auth.Challenge):
                return PlainTextResponse("", 401, headers={"WWW-Authenticate": outcome.www_authenticate})
            if isinstance(outcome, auth.Granted):
                return PlainTextResponse("", 200, headers={"Authentication-Info": outcome.authentication_info})
            return PlainTextResponse(outcome.reason, outcome.status)
        if current_user(server, request) is None:
            return _unauthorized(request)
        return grid_response(request, _about(server))

    def haystack(
        handler: Callable[[Server, Grid], Grid | His], right: users.Rights = "read"
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            user = current_user(server, request)
            if user is None:
                return _unauthorized(request)
            if not user.may(right):
                return grid_response(request, error_grid(f"user {user.name} has {user.rights} rights; this op needs {right}"))
            try:
                grid = await request_grid(request)
                answer = await run_in_threadpool(handler, server, grid)
            except InputError as exc:
                return grid_response(request, error_grid(str(exc)))
            except (BuildSmartError, psycopg.Error) as exc:
                log.warning("%s failed: %s", request.url.path, exc)
                return grid_response(request, error_grid(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"))
            return grid_response(request, answer)

        return endpoint

    def his_write(s: Server, grid: Grid) -> Grid:
        answer, stored = op_his_write(s, grid)
        s.metrics.ingest_rows.labels("hisWrite").inc(stored)
        return answer

    def ops(_: Server, __: Grid) -> Grid:
        return Grid.of([{"name": n, "summary": s} for n, s in OPS])

    def formats(_: Server, __: Grid) -> Grid:
        return Grid.of([{"mime": m, "receive": True, "send": True} for m in (zinc.MEDIA_TYPE, hayson.MEDIA_TYPE)])

    async def close(request: Request) -> Response:
        token = _bearer_token(request)
        if token:
            server.auth.revoke(token)
        return grid_response(request, EMPTY)

    # -- machines: /metrics and /ingest (bearer, cookie or Basic)

    async def machine_user(request: Request) -> users.User | None:
        return current_user(server, request) or await basic_user(server, request)

    async def metrics(request: Request) -> Response:
        if not options.metrics_public and await machine_user(request) is None:
            return PlainTextResponse(
                "authentication required (Basic or bearer)", 401, headers={"WWW-Authenticate": 'Basic realm="buildsmart"'}
            )
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def ingest(request: Request) -> Response:
        user = await machine_user(request)
        if user is None:
            return PlainTextResponse(
                "authentication required (Basic or bearer)", 401, headers={"WWW-Authenticate": 'Basic realm="buildsmart"'}
            )
        if not user.may("write"):
            return JSONResponse({"error": f"user {user.name} has {user.rights} rights; ingest needs write"}, 403)
        ctype = request.headers.get("content-type", "")
        fmt = request.query_params.get("format") or ("jsonl" if "json" in ctype else "csv")
        skip = request.query_params.get("rejects", "stop") == "skip"
        body = await request.body()
        if len(body) > MAX_BODY:
            return JSONResponse({"error": f"request body over {MAX_BODY >> 20} MB: send it in parts"}, 413)
        try:
            result = await run_in_threadpool(ingest_body, server, body, fmt, skip)
        except InputError as exc:
            server.metrics.ingest_rejects.labels("http").inc()
            return JSONResponse({"error": str(exc)}, 400)
        except BuildSmartError as exc:
            return JSONResponse({"error": str(exc)}, 503)
        server.metrics.ingest_rows.labels("http").inc(result["loaded"])
        server.metrics.ingest_rejects.labels("http").inc(result["rejected"])
        return JSONResponse(result)

    # -- the dashboard (cookie login)

    async def login_page(request: Request) -> Response:
        return FileResponse(STATIC / "login.html")

    async def login(request: Request) -> Response:
        form = await request.form()
        name, password = str(form.get("username", "")), str(form.get("password", ""))
        user = await run_in_threadpool(server.auth.password, name, password) if name and password else None
        if user is None:
            return RedirectResponse("/ui/login?failed=1", 303)
        response = RedirectResponse(str(form.get("next") or "/ui/"), 303)
        response.set_cookie(COOKIE, server.auth.issue(user), httponly=True, samesite="strict", path="/")
        return response

    async def logout(request: Request) -> Response:
        token = request.cookies.get(COOKIE)
        if token:
            server.auth.revoke(token)
        response = RedirectResponse("/ui/login", 303)
        response.delete_cookie(COOKIE, path="/")
        return response

    def page(name: str) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            if current_user(server, request) is None:
                return RedirectResponse(f"/ui/login?next={request.url.path}", 303)
            return FileResponse(STATIC / name, headers={"Cache-Control": "no-store"})

        return endpoint

    def ui_api(handler: Callable[[Request], Any]) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            if current_user(server, request) is None:
                return JSONResponse({"error": "log in first"}, 401)
            try:
                return JSONResponse(await run_in_threadpool(handler, request))
            except InputError as exc:
                return JSONResponse({"error": str(exc)}, 400)
            except (BuildSmartError, psycopg.Error) as exc:
                return JSONResponse({"error": str(exc).strip().splitlines()[0]}, 503)

        return endpoint

    def api_status(request: Request) -> Any:
        return dashboard.status_json(server.poller.latest(wait_s=15))

    def api_buildings(request: Request) -> Any:
        cat = server.records.catalogue()
        codes = sorted(set(cat.buildings) | {b for b, _ in cat.meters})
        return [
            {"code": c, "meters": sorted(m for b, m in cat.meters if b == c), "time_zone": cat.building(c).time_zone}
            for c in codes
        ]

    def api_building(request: Request) -> Any:
        code = request.path_params["code"]
        year = request.query_params.get("year")
        try:
            y = int(year) if year else None
        except ValueError as exc:
            raise InputError(InputLocation("query", 1), f"year {year!r} is not a number") from exc
        return dashboard.building_year(server.data, server.records.catalogue().building(code), y)

    def api_building_day(request: Request) -> Any:
        code = request.path_params["code"]
        text = request.query_params.get("date", "")
        try:
            day = date.fromisoformat(text)
        except ValueError as exc:
            raise InputError(InputLocation("query", 1), f"date {text!r} is not YYYY-MM-DD") from exc
        return dashboard.building_day(server.data, server.records.catalogue().building(code), day)

    async def root(request: Request) -> Response:
        return RedirectResponse("/ui/", 303)

    routes = [
        Route("/", root),
        Route("/api/about", about, methods=["GET", "POST"]),
        Route("/api/close", close, methods=["GET", "POST"]),
        Route("/api/ops", haystack(ops), methods=["GET", "POST"]),
        Route("/api/formats", haystack(formats), methods=["GET", "POST"]),
        Route("/api/read", haystack(op_read), methods=["GET", "POST"]),
        Route("/api/nav", haystack(op_nav), methods=["GET", "POST"]),
        Route("/api/hisRead", haystack(op_his_read), methods=["GET", "POST"]),
        Route("/api/hisWrite", haystack(his_write, "write"), methods=["POST"]),
        Route("/metrics", metrics),
        Route("/ingest", ingest, methods=["POST"]),
        Route("/ui/login", login_page, methods=["GET"]),
        Route("/ui/login", login, methods=["POST"]),
        Route("/ui/logout", logout, methods=["GET", "POST"]),
        Route("/ui/", page("cluster.html")),
        Route("/ui/building", page("building.html")),
        Route("/ui/api/status", ui_api(api_status)),
        Route("/ui/api/buildings", ui_api(api_buildings)),
        Route("/ui/api/building/{code}", ui_api(api_building)),
        Route("/ui/api/building/{code}/day", ui_api(api_building_day)),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.server = server

    app.add_middleware(Timing, metrics=server.metrics)
    return app
