"""The load balancer config in deploy/nginx against the service's settings, and its rendering for
``rlpips cluster`` (checked by ``nginx -t`` when nginx is installed; under ``CI=true`` it must be)."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from app.cli.cluster import NGINX_DIR, free_ports, nginx_binary, render_nginx, render_upstream
from app.config import Settings
from tests.support.tools import missing

PROXY = (NGINX_DIR / "rlpips-proxy.conf").read_text()
COMPOSE = (NGINX_DIR / "compose.conf").read_text()
UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def directive(text: str, name: str) -> str:
    found = re.findall(rf"^\s*{name}\s+([^;]+);", text, re.MULTILINE)
    assert len(found) == 1, (name, found)
    return str(found[0])


def seconds(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(ms|s|m)?", value).groups()  # type: ignore[union-attr]
    return int(number) * {"ms": 0.001, "s": 1, "m": 60, None: 1}[unit]


def test_body_limit_matches_the_service() -> None:
    number, unit = re.fullmatch(r"(\d+)([kmg]?)", directive(PROXY, "client_max_body_size")).groups()  # type: ignore[union-attr]
    limit = int(number) * UNITS[unit]
    assert limit == Settings().max_body_bytes
    assert f"({limit} bytes)" in PROXY  # the 413 body names the same limit


def test_timeouts_and_keepalive_fit_the_service() -> None:
    s = Settings()
    read = seconds(directive(PROXY, "proxy_read_timeout"))
    assert read > s.attack_deadline_s and read > s.deadline_s
    assert seconds(directive(PROXY, "proxy_send_timeout")) > s.deadline_s
    upstream = COMPOSE[COMPOSE.index("upstream rlpips {") :]
    assert seconds(directive(upstream, "keepalive_timeout")) < s.keepalive_timeout_s
    assert directive(PROXY, "proxy_http_version") == "1.1"
    assert directive(PROXY, "proxy_set_header Connection") == '""'
    retry = directive(PROXY, "proxy_next_upstream").split()
    assert {"error", "timeout", "http_503", "non_idempotent"} <= set(retry)
    assert "http_429" not in retry  # overload passes through to the client
    assert 2 <= int(directive(PROXY, "proxy_next_upstream_tries")) <= 5
    assert re.search(r"^\s*least_conn;", upstream, re.MULTILINE)


def test_every_lb_error_is_json_in_the_service_format() -> None:
    for status in (413, 502, 503, 504):
        assert re.search(rf"error_page {status} /_rlpips_error/{status};", PROXY)
        block = PROXY[PROXY.index(f"location = /_rlpips_error/{status} {{") :]
        block = block[: block.index("}\n")]
        assert "default_type application/json;" in block and "internal;" in block
        body = re.search(rf"return {status} '(.*)\\n';", block)
        assert body is not None, block
        error = json.loads(body.group(1))["error"]
        assert set(error) == {"code", "message"} and re.fullmatch(r"[a-z_]+", error["code"])


def test_rendering_for_loopback_replicas() -> None:
    site = render_upstream(COMPOSE, 8123, [9001, 9002, 9003], Path("/tmp/x/p.conf"), "hash")
    servers = re.findall(r"^\s*server ([^\s{]+)([^;\n]*);", site, re.MULTILINE)
    assert [s[0] for s in servers] == ["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"]
    assert all("max_fails=1" in s[1] and "resolve" not in s[1] for s in servers)
    assert not re.search(r"^\s*resolver\s", site, re.MULTILINE)
    assert "listen 127.0.0.1:8123;" in site
    assert "include /tmp/x/p.conf;" in site and "least_conn" not in site
    assert "hash $http_x_rlpips_reference consistent;" in site
    with pytest.raises(ValueError, match="listen 80"):
        render_upstream(COMPOSE.replace("listen 80;", "listen 81;"), 1, [2], Path("p"), "hash")


def _nginx() -> str:
    return nginx_binary() or missing(
        "nginx is not installed (Debian package nginx; .ci/run installs it)"
    )


def test_rendered_config_passes_nginx_t(tmp_path: Path) -> None:
    binary = _nginx()
    conf = render_nginx(tmp_path, 18999, [18001, 18002])
    done = subprocess.run(
        [binary, "-t", "-c", str(conf), "-p", str(tmp_path)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def test_nginx_own_errors_are_json_with_the_request_id(tmp_path: Path) -> None:
    """nginx alone, its replicas' ports closed: 502 and 413 come from nginx, as JSON."""
    binary = _nginx()
    port, *dead = free_ports(3, exclude=set())
    conf = render_nginx(tmp_path, port, dead)
    proc = subprocess.Popen([binary, "-c", str(conf), "-p", str(tmp_path)])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                r = httpx.post(f"{url}/distance", content=b"{}", headers={"X-Request-ID": "x-1"})
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, (tmp_path / "error.log").read_text()
                time.sleep(0.1)
        assert r.status_code == 502 and r.headers["content-type"] == "application/json"
        assert r.json()["error"]["code"] == "bad_gateway" and r.headers["x-request-id"] == "x-1"
        big = httpx.post(f"{url}/distance", content=b"\0" * (33 * 1024 * 1024), timeout=30)
        assert big.status_code == 413 and big.json()["error"]["code"] == "payload_too_large"
        assert len(big.headers["x-request-id"]) == 32  # nginx's own $request_id
    finally:
        proc.terminate()
        proc.wait(10)
