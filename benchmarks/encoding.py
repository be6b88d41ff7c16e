"""What a ``/distance`` response costs to encode, and whether orjson would save anything.

Encodes a real :class:`~app.api.schemas.DistanceResponse` (1 and 32 candidates, with per-layer values)
three ways and prints microseconds per response (best of 5 repeats of 2,000):

* ``fastapi``: the service's path — the route's response field serialised to JSON bytes by FastAPI
  (``serialize_response``, pydantic-core) exactly as the route does, with ``exclude_none``;
* ``pydantic``: ``model_dump_json(exclude_none=True)`` alone;
* ``orjson``: ``orjson.dumps(model_dump(exclude_none=True))`` (what ``ORJSONResponse`` would do),
  only if orjson is installed (it is not a dependency).

    python -m benchmarks.encoding
"""

from __future__ import annotations

import asyncio
import json
import timeit
from collections.abc import Callable
from typing import Any

from fastapi.routing import APIRoute, serialize_response

from app.api.distance import router
from app.api.schemas import DistanceResponse, PairResult, ThresholdBasis, Timing


def response(candidates: int) -> DistanceResponse:
    """A realistic response: ``candidates`` results with 5 per-layer values each."""
    results = [
        PairResult(
            distance=0.1234567 + i, near_duplicate=i == 0, per_layer=[0.01 * k for k in range(5)]
        )
        for i in range(candidates)
    ]
    timing = Timing(decode=3.1, queue=5.2, inference=40.3, total=49.9)
    return DistanceResponse(
        model="lpips-alex",
        resolution=(256, 256),
        threshold=0.4578,
        threshold_basis=ThresholdBasis(source="request"),
        results=results,
        timing_ms=timing,
    )


def _fastapi_us(resp: DistanceResponse, number: int = 2000) -> float:
    """Microseconds per response of FastAPI's own serialisation (best of 5 loops of ``number``)."""
    route = next(r for r in router.routes if isinstance(r, APIRoute) and r.path == "/distance")

    async def loop() -> None:
        for _ in range(number):
            await serialize_response(
                field=route.response_field, response_content=resp, exclude_none=True, dump_json=True
            )

    return 1e6 * min(timeit.repeat(lambda: asyncio.run(loop()), number=1, repeat=5)) / number


def _timed(fn: Callable[[], Any], number: int = 2000) -> float:
    """Best of 5 repeats, microseconds per call."""
    return 1e6 * min(timeit.repeat(fn, number=number, repeat=5)) / number


def main() -> None:
    out: dict[str, dict[str, float]] = {}
    for n in (1, 32):
        resp = response(n)
        row = {"bytes": float(len(resp.model_dump_json(exclude_none=True)))}
        row["fastapi_us"] = _fastapi_us(resp)
        row["pydantic_us"] = _timed(lambda resp=resp: resp.model_dump_json(exclude_none=True))
        try:
            import orjson

            row["orjson_us"] = _timed(
                lambda resp=resp: orjson.dumps(resp.model_dump(exclude_none=True))
            )
        except ImportError:
            pass
        out[f"candidates_{n}"] = row
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
