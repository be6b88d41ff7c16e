"""The OpenAPI document of one app, made exact for its settings: the request schemas name the loaded
models and the caps in force (candidates per request, attack steps, ε per norm), so that every request
the schema allows is accepted and every request it forbids is refused (checked with schemathesis)."""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from app.api.auth import PROBE_PATHS
from app.api.schemas import RobustnessOptions
from app.attacks.robustness import DEFAULT_STEPS
from app.config import Settings

Schema = dict[str, Any]

_MODELS = RobustnessOptions.model_fields["models"].description

#: The two ways to present an API key (:mod:`app.api.auth`).
SECURITY_SCHEMES: Schema = {
    "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    "Bearer": {"type": "http", "scheme": "bearer", "description": "the API key as a bearer token"},
}


def _nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def _described(schema: Schema, descriptions: dict[str, str]) -> None:
    """Put back the descriptions of the fields whose schema was replaced."""
    for name, field in schema["properties"].items():
        if name in descriptions:
            field.setdefault("description", descriptions[name])


def _descriptions(body: Schema) -> dict[str, str]:
    return {k: v["description"] for k, v in body["properties"].items() if "description" in v}


def _distance(body: Schema, settings: Settings, models: list[str], form: bool) -> None:
    body["additionalProperties"] = False
    props = body["properties"]
    descriptions = _descriptions(body)
    many = props["candidate" if form else "candidates"]
    many.update(minItems=1, maxItems=settings.max_candidates)
    name = {"type": "string", "enum": models}
    props["model"] = name if form else _nullable(name)
    _described(body, descriptions)


def _robustness(body: Schema, settings: Settings, models: list[str], form: bool) -> None:
    body["additionalProperties"] = False
    props = body["properties"]
    descriptions = _descriptions(body)
    names = {"type": "array", "items": {"type": "string", "enum": models}}
    props["models"] = names if form else _nullable(names)
    cap = settings.max_attack_steps
    steps: Schema = {"type": "integer", "minimum": 1, "maximum": cap}
    props["steps"] = steps if form else _nullable(steps)
    props["steps"]["default"] = min(DEFAULT_STEPS, cap)
    # ε's cap depends on the norm: one complete variant of the body per norm (L∞ is the default).
    epsilon_any: Schema = {"type": "number", "minimum": 0, "maximum": 1}
    props["epsilon"] = epsilon_any if form else _nullable(epsilon_any)
    variants = []
    for norm, eps_cap in (
        ("linf", settings.max_attack_epsilon),
        ("l2", settings.max_attack_epsilon_l2),
    ):
        variant = copy.deepcopy(body)
        vprops = variant["properties"]
        vprops["attack"] = {"type": "string", "enum": [norm]}
        epsilon: Schema = {"type": "number", "minimum": 0, "maximum": min(1.0, eps_cap)}
        vprops["epsilon"] = epsilon if form else _nullable(epsilon)
        if norm != "linf":
            variant["required"] = [*variant.get("required", []), "attack"]
        variants.append(variant)
    # The body keeps its properties (what each field is, which are files) and allows either variant.
    body["anyOf"] = variants
    if form:
        descriptions["models"] = f"{_MODELS}; repeat the field, or comma-separate"
    for schema in (body, *variants):
        _described(schema, descriptions)


def _content(doc: Schema, path: str, kind: str) -> Schema:
    body: Schema = doc["paths"][path]["post"]["requestBody"]["content"][kind]["schema"]
    return body


def _security(doc: Schema, settings: Settings) -> None:
    """Both key schemes; when keys are configured, every operation but the open probes needs one."""
    doc.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
    if not settings.api_keys:
        return
    open_paths = PROBE_PATHS if settings.open_probes else frozenset()
    for path, ops in doc["paths"].items():
        if path not in open_paths:
            for op in ops.values():
                op["security"] = [{"ApiKey": []}, {"Bearer": []}]


def install(app: FastAPI, settings: Settings, models: list[str]) -> None:
    """Replace ``app.openapi`` with one that states this app's models and caps (built once)."""

    def openapi() -> Schema:
        if app.openapi_schema is None:
            doc = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            for form, kind in ((True, "multipart/form-data"), (False, "application/json")):
                _distance(_content(doc, "/distance", kind), settings, models, form)
                _robustness(_content(doc, "/robustness-check", kind), settings, models, form)
            _security(doc, settings)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
