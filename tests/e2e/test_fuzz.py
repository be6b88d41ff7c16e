"""Schema-driven fuzzing (schemathesis) of every operation in ``/openapi.json`` against a real server.

The schema says exactly what is accepted: requests generated from it (bounded examples, derandomised so
CI is reproducible) pass *every* schemathesis check, positive and negative — valid requests are accepted,
invalid ones refused, answers have documented statuses, content types, headers and bodies, and nothing is
a 5xx. Image fields then carry real images. A second pass fills them with broken and arbitrary bytes too
(no schema can say which bytes decode): every answer is still documented and never a 5xx.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import CheckContext, not_a_server_error
from schemathesis.core.failures import AcceptedNegativeData
from schemathesis.core.transport import Response
from schemathesis.generation import GenerationMode
from schemathesis.generation.case import Case
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.specs.openapi.schemas import OpenApiSchema

from tests.support import badinputs as bad
from tests.support.serverutil import launch, wait_ready

pytestmark = pytest.mark.e2e

MAX_EXAMPLES = 300

#: The images that file (``format: binary``) and base64 (``format: byte``) fields draw from; each test
#: sets it (the format strategies are registered once, globally).
POOL: list[bytes] = []


def valid_images() -> list[bytes]:
    """Small real images of several formats, usual and unusual."""
    base = [bad.png_of(), bad.jpeg(), bad.encode(bad.gradient(9, 5), "GIF")]
    return [*base, bad.animated_gif()[0], bad.cmyk_jpeg()[0], bad.png16()[0], bad.exif_rotated()[0]]


def broken_images() -> list[bytes]:
    """The broken ones of the catalogue, and some arbitrary bytes."""
    broken = [bad.truncated(bad.png_of()), bad.corrupted_png_crc(), bad.png_bomb(), bad.SVG, b""]
    return broken + [bytes(range(i, i + 40)) for i in (0, 7, 130)]


def register_image_formats() -> None:
    pick = st.integers(min_value=0, max_value=10**6).map(lambda i: POOL[i % len(POOL)])
    schemathesis.openapi.format("binary", pick)
    schemathesis.openapi.format("byte", pick.map(lambda b: base64.b64encode(b).decode()))


@pytest.fixture(scope="module")
def live_schema(
    weights_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OpenApiSchema]:
    tmp = tmp_path_factory.mktemp("fuzz")
    log = tmp / "server.log"
    env = {
        "RLPIPS_DATA_DIR": str(tmp / "data"),
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


def _plain(value: Any) -> Any:
    """A multipart value as JSON Schema sees it: files (bytes, schemathesis' ``Binary``) as a string."""
    return value if type(value) in (str, int, float, bool, type(None), dict) else "file"


def _as_sent(body: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """A generated multipart body as the server receives it: a list for a scalar field is sent as the
    field repeated, so an empty list is no field and a one-item list is that item."""
    props = schema.get("properties", {})
    out: dict[str, Any] = {}
    for key, value in body.items():
        if isinstance(value, list) and props.get(key, {}).get("type") not in ("array", None):
            if not value:
                continue
            value = value[0] if len(value) == 1 else value
        out[key] = [_plain(v) for v in value] if isinstance(value, list) else _plain(value)
    return out


def negative_data_rejection_on_the_wire(
    ctx: CheckContext, response: Response, case: Case
) -> bool | None:
    """schemathesis' ``negative_data_rejection``, except for multipart bodies whose "invalid" value is
    valid once encoded (schemathesis judges the body before encoding, and makes the same allowance for
    query parameters but not for form fields): e.g. ``per_layer: [false]`` is sent as ``per_layer=false``.
    """
    try:
        return negative_data_rejection(ctx, response, case)
    except AcceptedNegativeData:
        if case.media_type == "multipart/form-data" and isinstance(case.body, dict):
            content = case.operation.definition.raw["requestBody"]["content"]
            schema = content["multipart/form-data"]["schema"]
            if jsonschema_rs.validator_for(schema).is_valid(_as_sent(case.body, schema)):
                return None
        raise


#: Every operation of the API (a test below checks the live schema has exactly these).
OPERATIONS = [
    ("POST", "/distance"),
    ("POST", "/robustness-check"),
    ("GET", "/models"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("PUT", "/banks/{bank}"),
    ("GET", "/banks/{bank}"),
    ("DELETE", "/banks/{bank}"),
    ("POST", "/banks/{bank}/items"),
    ("DELETE", "/banks/{bank}/items/{item}"),
    ("POST", "/banks/{bank}/search"),
]
#: What every answer is held to when image fields carry arbitrary bytes.
DOCUMENTED = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
MODES = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + [
    (m, p, GenerationMode.NEGATIVE) for m, p in OPERATIONS if m == "POST"
]


def test_every_operation_is_fuzzed(live_schema: OpenApiSchema) -> None:
    live = {(op.ok().method.upper(), op.ok().path) for op in live_schema.get_all_operations()}
    assert live == set(OPERATIONS)


def _fuzz(
    live_schema: OpenApiSchema, method: str, path: str, mode: GenerationMode, **checks: Any
) -> None:
    operation = live_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=MAX_EXAMPLES if method == "POST" else 5,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Case) -> None:
        case.call_and_validate(timeout=60, **checks)

    run()


@pytest.mark.parametrize(
    ("method", "path", "mode"),
    MODES,
    ids=lambda v: v.value if isinstance(v, GenerationMode) else str(v),
)
def test_every_check_passes_with_real_images(
    live_schema: OpenApiSchema, method: str, path: str, mode: GenerationMode
) -> None:
    POOL[:] = valid_images()
    _fuzz(
        live_schema,
        method,
        path,
        mode,
        excluded_checks=[negative_data_rejection],
        additional_checks=[negative_data_rejection_on_the_wire],
    )


@pytest.mark.parametrize(
    ("method", "path", "mode"),
    [m for m in MODES if m[0] == "POST"],
    ids=lambda v: v.value if isinstance(v, GenerationMode) else str(v),
)
def test_broken_images_get_documented_answers(
    live_schema: OpenApiSchema, method: str, path: str, mode: GenerationMode
) -> None:
    POOL[:] = valid_images() + broken_images() * 2
    _fuzz(live_schema, method, path, mode, checks=DOCUMENTED)
