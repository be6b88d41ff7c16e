"""Real ``rlpips serve`` (uvicorn) processes on 127.0.0.1 for the end-to-end, shutdown and fuzz tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support import ROOT


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_ready(server: Server, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            pytest.fail(f"server exited with {server.proc.returncode}:\n{server.log.read_text()}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"server not ready after {timeout_s} s:\n{server.log.read_text()}")


def launch(
    weights_dir: Path, log: Path, env: Mapping[str, str], args: Sequence[str] = ()
) -> Server:
    """Start ``rlpips serve`` on a free port with the offline weights and ``env`` (``RLPIPS_*``
    overrides); output goes to ``log``. Not yet ready: call :func:`wait_ready`."""
    port = free_port()
    full_env = os.environ | {"RLPIPS_WEIGHTS_DIR": str(weights_dir), **env}
    cmd = [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*cmd, *args], cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT
        )
    return Server(proc, f"http://127.0.0.1:{port}", log)


@contextmanager
def running(weights_dir: Path, log: Path, env: Mapping[str, str]) -> Iterator[Server]:
    """A ready ``rlpips serve`` (see :func:`launch`), killed on exit if still running."""
    srv = launch(weights_dir, log, env)
    try:
        wait_ready(srv)
        yield srv
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait(30)
