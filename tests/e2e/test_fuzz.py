"""Schema-driven fuzzing (schemathesis) of every operation in ``/openapi.json`` against a real server.

Valid and invalid requests are generated from the schema (bounded examples, derandomised so CI is
reproducible); every answer must be no 5xx, a documented status and content type, and match the
documented response schema.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.generation.case import Case
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.specs.openapi.schemas import OpenApiSchema

from tests.support import badinputs as bad
from tests.support.serverutil import launch, wait_ready

pytestmark = pytest.mark.e2e

MAX_EXAMPLES = 300


@pytest.fixture(scope="module")
def live_schema(
    weights_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OpenApiSchema]:
    log = tmp_path_factory.mktemp("fuzz") / "server.log"
    env = {
        "RLPIPS_RESOLUTION": "32",
        "RLPIPS_MODELS": "lpips-alex",
        "RLPIPS_MAX_WAIT_MS": "1",
        "RLPIPS_MAX_ATTACK_STEPS": "10",
        "RLPIPS_MAX_BODY_BYTES": "200000",
        "RLPIPS_DRAIN_S": "0",
    }
    server = launch(weights_dir, log, env)
    proc = server.proc
    try:
        wait_ready(server)
        register_image_formats()
        yield schemathesis.openapi.from_url(f"{server.url}/openapi.json", timeout=30)
    finally:
        proc.terminate()
        proc.wait(60)
    text = log.read_text()
    assert "Traceback" not in text, text[-5000:]


def image_samples() -> list[bytes]:
    """Valid small images of several formats, and the unusual and broken ones of the catalogue."""
    base = [bad.png_of(), bad.jpeg(), bad.encode(bad.gradient(9, 5), "GIF")]
    unusual = [bad.animated_gif()[0], bad.cmyk_jpeg()[0], bad.png16()[0], bad.exif_rotated()[0]]
    broken = [bad.truncated(bad.png_of()), bad.corrupted_png_crc(), bad.png_bomb(), bad.SVG, b""]
    return base + unusual + broken


def register_image_formats() -> None:
    """File fields (``format: binary``) and base64 fields (``format: byte``) get real images half the
    time, arbitrary bytes otherwise, so that generated requests reach decoding and the device."""
    images = st.sampled_from(image_samples())
    raw = st.one_of(images, images, st.binary(max_size=64))
    schemathesis.openapi.format("binary", raw)
    schemathesis.openapi.format("byte", raw.map(lambda b: base64.b64encode(b).decode()))


#: Every operation of the API (a test below checks the live schema has exactly these).
OPERATIONS = [
    ("POST", "/distance"),
    ("POST", "/robustness-check"),
    ("GET", "/models"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
]
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def test_every_operation_is_fuzzed(live_schema: OpenApiSchema) -> None:
    live = {(op.ok().method.upper(), op.ok().path) for op in live_schema.get_all_operations()}
    assert live == set(OPERATIONS)


@pytest.mark.parametrize(
    ("method", "path", "mode"),
    [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS]
    + [(m, p, GenerationMode.NEGATIVE) for m, p in OPERATIONS if m == "POST"],
    ids=lambda v: v.value if isinstance(v, GenerationMode) else str(v),
)
def test_generated_requests(
    live_schema: OpenApiSchema, method: str, path: str, mode: GenerationMode
) -> None:
    operation = live_schema[path][method]
    examples = MAX_EXAMPLES if method == "POST" else 5

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Case) -> None:
        case.call_and_validate(checks=CHECKS, timeout=60)

    run()
