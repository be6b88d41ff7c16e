"""``rlpips cluster --replicas N --port P``: nginx on 127.0.0.1:P in front of N ``rlpips serve``
replicas on free loopback ports, all child processes of this supervisor (a local demo of the deployed
shape, and what the end-to-end tests and ``benchmarks/rolling_restart.py`` run).

* The nginx config is rendered from ``deploy/nginx/compose.conf`` (its upstream servers replaced by the
  loopback replicas) and includes ``deploy/nginx/rlpips-proxy.conf`` unchanged: the same settings as
  the compose load balancer (:func:`render_upstream`).
* A replica that exits while the cluster runs is started again on the same port: a replica sent
  SIGTERM drains, exits and comes back (a rolling restart, one replica at a time); one that crashes
  is restarted too, after a back-off that grows while it keeps dying before it was ready.
* ``--state-file`` gets a JSON object with the nginx and replica pids and ports, rewritten on every
  change, so tests and benchmarks can signal replicas.
* SIGTERM or SIGINT stops everything: the replicas get SIGTERM and drain (nginx still routes to the
  others meanwhile), then nginx quits gracefully. Children are in their own process group (a Ctrl-C in
  the terminal reaches only this supervisor) and get SIGTERM if the supervisor itself dies.

Imports no torch: the replicas are separate ``python -m app.cli serve`` processes.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.config import Settings

log = logging.getLogger(__name__)

#: deploy/nginx of this repository: compose.conf (upstream + server) and rlpips-proxy.conf.
NGINX_DIR = Path(__file__).resolve().parents[2] / "deploy" / "nginx"
#: Upstream balancing: least connections (the default), or affinity on a client-sent reference key.
BALANCE = {
    "least_conn": "least_conn;",
    "hash": "hash $http_x_rlpips_reference consistent;",
}
_PR_SET_PDEATHSIG = 1


def nginx_binary() -> str | None:
    """nginx from ``PATH``, else the Debian location; ``None`` when it is not installed."""
    found = shutil.which("nginx")
    candidates = (found, "/usr/sbin/nginx", "/usr/local/sbin/nginx")
    return next((p for p in candidates if p and Path(p).is_file()), None)


def _sub_once(pattern: str, repl: str, text: str, what: str) -> str:
    new, n = re.subn(pattern, repl, text, flags=re.MULTILINE)
    if n == 0:
        raise ValueError(f"compose.conf: {what} not found (pattern {pattern!r})")
    return new


def render_upstream(
    compose_conf: str, port: int, replica_ports: list[int], proxy_conf: Path, balance: str
) -> str:
    """``compose.conf`` for loopback replicas: its ``server NAME resolve PARAMS;`` lines become one
    ``server 127.0.0.1:PORT PARAMS;`` per replica, ``resolver`` goes, ``listen 80`` becomes
    ``127.0.0.1:port``, the include points at ``proxy_conf`` and ``least_conn`` becomes ``balance``."""
    pattern = r"^(\s*)server\s+\S+\s+resolve\b([^;]*);\n"
    first = re.search(pattern, compose_conf, re.MULTILINE)
    if first is None:
        raise ValueError("compose.conf: no `server NAME resolve ...;` line in the upstream")
    indent, params = first.groups()
    loopback = "".join(f"{indent}server 127.0.0.1:{p}{params};\n" for p in replica_ports)
    text = compose_conf[: first.start()] + loopback + compose_conf[first.end() :]
    text = re.sub(pattern, "", text, flags=re.MULTILINE)
    text = _sub_once(r"^\s*resolver\s[^;]*;\n", "", text, "resolver")
    text = _sub_once(r"^(\s*)listen\s+80;", rf"\g<1>listen 127.0.0.1:{port};", text, "listen 80")
    text = _sub_once(
        r"^(\s*)include\s+/etc/nginx/rlpips-proxy\.conf;", rf"\g<1>include {proxy_conf};", text,
        "include /etc/nginx/rlpips-proxy.conf",
    )  # fmt: skip
    return _sub_once(r"^(\s*)least_conn;", rf"\g<1>{BALANCE[balance]}", text, "least_conn")


def render_nginx(
    out: Path, port: int, replica_ports: list[int], balance: str = "least_conn"
) -> Path:
    """Write ``nginx.conf`` (and the files it includes) for the cluster into ``out``; returns it."""
    proxy_conf = out / "rlpips-proxy.conf"
    shutil.copyfile(NGINX_DIR / "rlpips-proxy.conf", proxy_conf)
    site = render_upstream(
        (NGINX_DIR / "compose.conf").read_text(), port, replica_ports, proxy_conf, balance
    )
    (out / "cluster.conf").write_text(site)
    main = (
        # as root the workers would drop to nobody, who cannot write into a private temp dir
        ("user root;\n" if os.geteuid() == 0 else "")
        + f"worker_processes 1;\ndaemon off;\npid {out}/nginx.pid;\nerror_log {out}/error.log warn;\n"
        "events { worker_connections 1024; }\nhttp {\n"
        '  log_format rlpips \'$remote_addr "$request" $status $request_time '
        "$upstream_addr $upstream_status $rlpips_request_id';\n"
        f"  access_log {out}/access.log rlpips;\n"
        f"  client_body_temp_path {out}/body;\n  proxy_temp_path {out}/proxy;\n"
        f"  fastcgi_temp_path {out}/fastcgi;\n  uwsgi_temp_path {out}/uwsgi;\n"
        f"  scgi_temp_path {out}/scgi;\n"
        f"  include {out}/cluster.conf;\n}}\n"
    )
    conf = out / "nginx.conf"
    conf.write_text(main)
    return conf


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the supervisor dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _spawn(cmd: list[str], out: IO[bytes] | None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        cmd, stdout=out, stderr=subprocess.STDOUT if out else None,
        process_group=0, preexec_fn=_die_with_parent,
    )  # fmt: skip


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class Replica:
    """One ``rlpips serve`` child on a fixed loopback port."""

    index: int
    port: int
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started: float = 0.0
    ready: bool = False
    failures: int = 0  # exits in a row before becoming ready (back-off)
    not_before: float = 0.0


@dataclass
class Cluster:
    """The supervisor: replicas, nginx, the state file (see the module docstring)."""

    replicas: int
    port: int
    workdir: Path
    log_dir: Path | None = None
    state_file: Path | None = None
    balance: str = "least_conn"
    serve_args: list[str] = field(default_factory=list)
    members: list[Replica] = field(default_factory=list)
    nginx: subprocess.Popen[bytes] | None = None
    stopping: bool = False

    def start(self, ready_timeout_s: float) -> None:
        """Start the replicas, wait until all are ready, then start nginx and wait for it."""
        ports = free_ports(self.replicas, exclude={self.port})
        self.members = [Replica(i, p) for i, p in enumerate(ports)]
        for replica in self.members:
            self._start_replica(replica)
        deadline = time.monotonic() + ready_timeout_s
        while not all(r.ready for r in self.members):
            if self.stopping:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"replicas not ready after {ready_timeout_s:g} s")
            self.check()
            time.sleep(0.2)
        binary = nginx_binary()
        if binary is None:
            raise RuntimeError("nginx is not installed (Debian package nginx)")
        conf = render_nginx(self.workdir, self.port, [r.port for r in self.members], self.balance)
        out = self._log("nginx")
        self.nginx = _spawn([binary, "-c", str(conf), "-p", str(self.workdir)], out)
        if out:
            out.close()
        while not _ready(self.port):
            if self.nginx.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.nginx.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"nginx not answering after {ready_timeout_s:g} s")
            time.sleep(0.1)
        log.info(
            "cluster ready on http://127.0.0.1:%d: nginx pid %d, replicas %s",
            self.port,
            self.nginx.pid,
            ", ".join(f"{r.proc.pid if r.proc else '-'}@{r.port}" for r in self.members),
        )
        self.write_state()

    def check(self) -> None:
        """One supervision pass: note replicas that became ready, restart those that exited."""
        now = time.monotonic()
        for r in self.members:
            if r.proc is None:
                if now >= r.not_before:
                    r.restarts += 1
                    self._start_replica(r)
                continue
            code = r.proc.poll()
            if code is None:
                if not r.ready and _ready(r.port):
                    r.ready, r.failures = True, 0
                    log.info("replica %d ready (pid %d, port %d)", r.index, r.proc.pid, r.port)
                    self.write_state()
                continue
            r.failures = 0 if r.ready else r.failures + 1
            delay = min(2.0 ** (r.failures - 1), 30.0) if r.failures else 0.0
            log.warning(
                "replica %d (pid %d) exited with %s; restarting in %.0f s",
                r.index, r.proc.pid, code, delay,
            )  # fmt: skip
            r.proc, r.ready, r.not_before = None, False, now + delay
            self.write_state()
        if self.nginx is not None and self.nginx.poll() is not None:
            raise RuntimeError(f"nginx exited with {self.nginx.returncode}")

    def run(self) -> None:
        """Supervise until :meth:`request_stop` (a signal)."""
        while not self.stopping:
            self.check()
            time.sleep(0.2)

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        if not self.stopping:
            log.info("signal %d: stopping the replicas (they drain), then nginx", signum)
        self.stopping = True

    def stop(self, timeout_s: float) -> None:
        """SIGTERM to every replica (each drains, then exits); then nginx quits gracefully."""
        running = [r.proc for r in self.members if r.proc is not None and r.proc.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in running:
            _wait_or_kill(proc, deadline)
        if self.nginx is not None and self.nginx.poll() is None:
            self.nginx.send_signal(signal.SIGQUIT)  # graceful: finish the open requests
            _wait_or_kill(self.nginx, time.monotonic() + 10)
        log.info("cluster stopped")

    def _log(self, name: str) -> IO[bytes] | None:
        return (self.log_dir / f"{name}.log").open("ab") if self.log_dir else None

    def _start_replica(self, replica: Replica) -> None:
        cmd = [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1"]
        out = self._log(f"replica-{replica.index}")
        replica.proc = _spawn([*cmd, "--port", str(replica.port), *self.serve_args], out)
        if out:
            out.close()
        replica.started = time.monotonic()
        replica.ready = False
        log.info("replica %d: pid %d on port %d", replica.index, replica.proc.pid, replica.port)
        self.write_state()

    def write_state(self) -> None:
        """Rewrite the state file (atomically) with the current pids and ports."""
        if self.state_file is None:
            return
        state: dict[str, Any] = {
            "url": f"http://127.0.0.1:{self.port}",
            "supervisor_pid": os.getpid(),
            "nginx_pid": self.nginx.pid if self.nginx else None,
            "nginx_dir": str(self.workdir),
            "replicas": [
                {
                    "index": r.index,
                    "port": r.port,
                    "pid": r.proc.pid if r.proc else None,
                    "ready": r.ready,
                    "restarts": r.restarts,
                }
                for r in self.members
            ],
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.state_file)


def _wait_or_kill(proc: subprocess.Popen[bytes], deadline: float) -> None:
    try:
        proc.wait(max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        log.error("pid %d still running at the deadline: killing it", proc.pid)
        proc.kill()
        proc.wait()


def free_ports(n: int, exclude: set[int]) -> list[int]:
    """``n`` distinct free loopback ports (all held open while choosing), none in ``exclude``."""
    held: list[socket.socket] = []
    try:
        while len(held) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            if s.getsockname()[1] in exclude:
                s.close()
                continue
            held.append(s)
        return [int(s.getsockname()[1]) for s in held]
    finally:
        for s in held:
            s.close()


def cmd_cluster(args: argparse.Namespace, settings: Settings) -> int:
    """Run the cluster until a signal; 1 when it could not start or nginx died."""
    logging.getLogger("app").setLevel(logging.INFO)
    if args.replicas < 1:
        raise ValueError(f"--replicas must be at least 1, got {args.replicas}")
    if nginx_binary() is None:
        raise FileNotFoundError("nginx is not installed (Debian package nginx; or put it on PATH)")
    workdir = Path(tempfile.mkdtemp(prefix="rlpips-cluster-"))
    if args.log_dir is not None:
        args.log_dir.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(
        args.replicas, args.port, workdir, args.log_dir, args.state_file, args.balance,
        ["--log-level", args.log_level],
    )  # fmt: skip
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, cluster.request_stop)
    code = 0
    try:
        cluster.start(args.ready_timeout)
        cluster.run()
    except RuntimeError as exc:
        log.error("%s", exc)
        code = 1
    finally:
        cluster.stop(args.stop_timeout)
        shutil.rmtree(workdir, ignore_errors=True)
        if args.state_file is not None:
            args.state_file.unlink(missing_ok=True)
    return code


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "cluster", help="nginx on 127.0.0.1:PORT in front of N `rlpips serve` replicas"
    )
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--balance", choices=sorted(BALANCE), default="least_conn")
    p.add_argument("--state-file", type=Path, help="JSON with the pids and ports, kept current")
    p.add_argument("--log-dir", type=Path, help="replica-N.log and nginx.log here (else inherited)")
    p.add_argument("--log-level", default="info", help="the replicas' log level")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to start up")
    p.add_argument(
        "--stop-timeout", type=float, default=60.0,
        help="seconds the replicas get to drain and exit on stop (then killed); above RLPIPS_GRACE_S",
    )  # fmt: skip
    p.set_defaults(func=cmd_cluster)
