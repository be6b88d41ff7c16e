"""``rlpips serve``: the app under uvicorn with a graceful, bounded shutdown.

On the first SIGTERM (or SIGINT) the runtime starts draining at once: ``/readyz`` answers 503 and new
work gets 503 ``draining``, while requests already taken go on. The listener stays open for ``drain_s``
so that load balancers see the failing probe and stop routing here, then uvicorn's own graceful
shutdown runs: it stops listening and waits for in-flight requests until ``STOP_MARGIN_S`` before the
end of ``grace_s``, cancels those still running, and the app's lifespan stops the runtime in that
margin. A watchdog ends the process (status 3) if all of this has not finished ``grace_s`` after the
signal. A second signal skips the rest of the drain period.

Connections are served by :class:`~app.api.protocol.GuardedProtocol` (header timeout and size, idle
connections closed, JSON bodies for HTTP-level errors); the access log never shows query strings (a
client may put a secret there). Log lines carry the request ID, as text or JSON (``RLPIPS_LOG_FORMAT``);
``X-Forwarded-For`` / ``-Proto`` are trusted from ``RLPIPS_FORWARDED_ALLOW_IPS`` only.

One process per container (or per ``rlpips cluster`` replica): scaling out is replicas behind a load
balancer, not uvicorn workers (measured in docs/deploy/load-balancer.md).
"""

from __future__ import annotations

import argparse
import logging
import logging.config
import math
import os
import signal
import threading
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

from app.api.protocol import guarded_protocol
from app.config import Settings
from app.logs import log_config
from app.main import create_app
from app.serving.runtime import Runtime

log = logging.getLogger(__name__)

#: Exit status when the grace period ran out before a clean shutdown.
EXIT_GRACE_EXCEEDED = 3
#: Seconds of the grace period kept for stopping the runtime after in-flight requests are cancelled.
STOP_MARGIN_S = 5.0
#: Request headers larger than this are refused (431).
MAX_HEADER_BYTES = 64 * 1024


class RedactQuery(logging.Filter):
    """Drops the query string from uvicorn's access-log lines (``args[2]`` is the path)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            record.args = (*args[:2], args[2].split("?", 1)[0], *args[3:])
        return True


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first exit signal starts a drain period (see the module docstring)."""

    def __init__(
        self, config: uvicorn.Config, app: FastAPI, drain_s: float, grace_s: float
    ) -> None:
        super().__init__(config)
        self.app = app
        self.drain_s = drain_s
        self.grace_s = grace_s
        self.drain_started: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_started is not None or self.should_exit:
            super().handle_exit(sig, frame)  # a second signal: shut down now (a third: force)
            return
        self._captured_signals.append(sig)  # re-raised after shutdown, as uvicorn does
        self.drain_started = time.monotonic()
        runtime: Runtime | None = self.app.state.runtime
        if runtime is not None:
            runtime.draining = True
        log.info(
            "signal %d: draining (readiness off, new work refused) for %.1f s; exit within %.1f s",
            sig,
            self.drain_s,
            self.grace_s,
        )
        _start_watchdog(self.grace_s)

    async def on_tick(self, counter: int) -> bool:
        if (
            self.drain_started is not None
            and not self.should_exit
            and time.monotonic() - self.drain_started >= self.drain_s
        ):
            self.should_exit = True
        return await super().on_tick(counter)


def _start_watchdog(grace_s: float) -> None:
    def expire() -> None:
        log.error("graceful shutdown took longer than %.1f s: exiting now", grace_s)
        logging.shutdown()
        os._exit(EXIT_GRACE_EXCEEDED)

    timer = threading.Timer(grace_s, expire)
    timer.daemon = True
    timer.start()


def serve(settings: Settings, host: str, port: int, log_level: str = "info") -> None:
    """Serve one app on ``host:port`` until a signal; returns after the graceful shutdown."""
    logging.config.dictConfig(log_config(settings.log_format, log_level))  # before the app logs
    app = create_app(settings)
    in_flight_s = settings.grace_s - settings.drain_s - STOP_MARGIN_S
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=guarded_protocol(settings.header_timeout_s, MAX_HEADER_BYTES),
        timeout_keep_alive=max(1, math.ceil(settings.keepalive_timeout_s)),
        timeout_graceful_shutdown=max(1, int(in_flight_s)),
        log_config=None,  # configured above
        proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        root_path=settings.root_path,
    )
    logging.getLogger("uvicorn.access").addFilter(RedactQuery())
    DrainingServer(config, app, settings.drain_s, settings.grace_s).run()


def _exit_after_shutdown(signum: int, frame: object) -> None:
    """Uvicorn re-raises SIGINT/SIGTERM after its graceful shutdown: end with status 0, no trace."""
    raise SystemExit(0)


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    logging.getLogger("app").setLevel(args.log_level.upper())
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _exit_after_shutdown)
    if args.grace is not None:
        settings = Settings.model_validate(settings.model_dump() | {"grace_s": args.grace})
    serve(settings, args.host, args.port, args.log_level)
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("serve", help="run the HTTP service (uvicorn)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log-level", default="info")
    p.add_argument(
        "--grace",
        type=float,
        default=None,
        help="graceful shutdown bound in seconds, signal to exit (default: RLPIPS_GRACE_S or 30)",
    )
    p.set_defaults(func=cmd_serve)
