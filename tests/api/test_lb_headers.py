"""Serving behind a load balancer, through the ASGI app: ``X-Request-ID`` accepted when usable, else
generated, and echoed on every response (middleware refusals and errors included); ``Connection: close``
once the service drains; the request ID in log records (text and JSON); the drain default."""

from __future__ import annotations

import io
import json
import logging
import logging.config
import re
from pathlib import Path
from urllib.parse import urljoin

import httpx
import pytest

from app.config import Settings
from app.logs import REQUEST_ID, JsonFormatter, RequestIdFilter, log_config
from app.main import create_app
from tests.support.apiutil import jpegs, multipart, runtime, serve, tiny_settings

HEX32 = re.compile(r"[0-9a-f]{32}")


async def test_request_id_is_echoed_or_generated(tiny_store: Path) -> None:
    async with serve(tiny_settings(tiny_store)) as (client, _):
        r = await client.get("/healthz", headers={"X-Request-ID": "abc-123_XYZ.9"})
        assert r.headers["x-request-id"] == "abc-123_XYZ.9"
        longest = "r" * 128
        r = await client.get("/healthz", headers={"X-Request-ID": longest})
        assert r.headers["x-request-id"] == longest
        r = await client.get("/healthz")
        assert HEX32.fullmatch(r.headers["x-request-id"])
        for unusable in ("r" * 129, "two words", "", "bad\x7fbyte"):
            r = await client.get("/healthz", headers={"X-Request-ID": unusable})
            assert HEX32.fullmatch(r.headers["x-request-id"]), unusable
        first, second = [(await client.get("/healthz")).headers["x-request-id"] for _ in range(2)]
        assert first != second


async def test_request_id_on_errors_and_middleware_refusals(tiny_store: Path) -> None:
    s = tiny_settings(tiny_store, api_keys="k-123456", max_body_bytes=4096)
    async with serve(s) as (client, _):
        ids = {"X-Request-ID": "req-err-1"}
        refused = await client.post("/distance", content=b"x", headers=ids)  # no key: 401
        assert refused.status_code == 401 and refused.headers["x-request-id"] == "req-err-1"
        keyed = ids | {"X-API-Key": "k-123456"}
        missing = await client.get("/nowhere", headers=keyed)
        assert missing.status_code == 404 and missing.headers["x-request-id"] == "req-err-1"
        big = await client.post(
            "/distance", content=b"x" * 5000, headers=keyed | {"Content-Type": "application/json"}
        )
        assert big.status_code == 413 and big.headers["x-request-id"] == "req-err-1"
        assert big.json()["error"]["code"] == "payload_too_large"


async def test_connection_close_while_draining(tiny_store: Path) -> None:
    imgs = jpegs(2)
    async with serve(tiny_settings(tiny_store)) as (client, app):
        r = await client.post("/distance", files=multipart(*imgs))
        assert r.status_code == 200 and r.headers.get("connection") != "close"
        runtime(app).draining = True
        for r in (
            await client.get("/readyz"),
            await client.get("/healthz"),
            await client.post("/distance", files=multipart(*imgs)),
        ):
            assert r.headers["connection"] == "close", r.status_code
        assert r.status_code == 503 and r.json()["error"]["code"] == "draining"


def _record(msg: str = "hello %s", args: tuple[object, ...] = ("world",)) -> logging.LogRecord:
    return logging.LogRecord("app.test", logging.INFO, __file__, 1, msg, args, None)


def test_log_records_carry_the_request_id() -> None:
    record = _record()
    assert RequestIdFilter().filter(record) and record.request_id == "-"
    token = REQUEST_ID.set("req-42")
    try:
        record = _record()
        RequestIdFilter().filter(record)
    finally:
        REQUEST_ID.reset(token)
    assert record.request_id == "req-42"
    line = json.loads(JsonFormatter().format(record))
    assert line["request_id"] == "req-42" and line["message"] == "hello world"
    assert line["level"] == "INFO" and line["logger"] == "app.test"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_log_config_puts_the_request_id_in_app_and_access_lines(fmt: str) -> None:
    config = log_config(fmt, "info")  # type: ignore[arg-type]
    logging.config.dictConfig(config)
    stream = io.StringIO()
    try:
        for name in ("app", "uvicorn.access"):
            handler = logging.getLogger(name).handlers[0]
            assert isinstance(handler, logging.StreamHandler)
            handler.setStream(stream)
        token = REQUEST_ID.set("req-log-7")
        try:
            logging.getLogger("app.api").info("inside")
            logging.getLogger("uvicorn.access").info(
                '%s - "%s %s HTTP/%s" %d', "1.2.3.4", "GET", "/x", "1.1", 200
            )
        finally:
            REQUEST_ID.reset(token)
        lines = stream.getvalue().splitlines()
    finally:
        logging.config.dictConfig({"version": 1, "disable_existing_loggers": False})
        for name in ("app", "uvicorn", "uvicorn.access"):
            logging.getLogger(name).handlers.clear()
            logging.getLogger(name).propagate = True
    assert len(lines) == 2
    for line in lines:
        if fmt == "json":
            assert json.loads(line)["request_id"] == "req-log-7"
        else:
            assert "[req-log-7]" in line


def test_drain_lasts_at_least_one_probe_interval() -> None:
    s = Settings()
    assert s.drain_s >= 10 and s.drain_s < s.grace_s
    assert "127.0.0.1" in s.forwarded_allow_ips.split(",") and "*" not in s.forwarded_allow_ips
    with pytest.raises(ValueError, match="drain_s"):
        Settings(drain_s=30, grace_s=30)


async def test_root_path_puts_the_prefix_in_the_api_docs(tiny_store: Path) -> None:
    """Behind a proxy that strips ``/rlpips`` (uvicorn sets the ASGI root path from RLPIPS_ROOT_PATH)."""
    app = create_app(tiny_settings(tiny_store, root_path="/rlpips"))
    transport = httpx.ASGITransport(app=app, root_path="/rlpips")
    async with httpx.AsyncClient(transport=transport, base_url="http://lb") as client:
        r = await client.get("/openapi.json")
        assert r.status_code == 200 and r.json()["servers"] == [{"url": "/rlpips"}]
        # /docs names its script and the spec relatively, so they resolve under the prefix
        assert 'src="static/docs.js"' in (await client.get("/docs")).text
        assert 'url: "openapi.json"' in (await client.get("/static/docs.js")).text
        assert urljoin("http://lb/rlpips/docs", "openapi.json") == "http://lb/rlpips/openapi.json"
