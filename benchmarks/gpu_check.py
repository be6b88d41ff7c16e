"""The one-command device check (``make gpu-check``), for the rare lease of a bare GPU machine.

Two subcommands:

* ``bundle`` (here, with network and ``../shared``): puts into one ignored folder (default ``.gpu/``)
  everything the device lacks — wheels of this service's dependencies for its Python 3.12 (its torch,
  torchvision, numpy, Pillow, httpx… are used as they are), the offline weights, the golden pairs and a
  sample of ImageNet JPEGs and Kodak images.
* ``run`` (there): installs the wheels into ``BUNDLE/site`` (``--no-deps``, never touching torch), then
  runs the ``gpu``-marked tests, measures fp16/bf16 parity with fp32 on the golden pairs, JPEG decoding
  on the device (nvJPEG) against the Pillow path (distance parity and images/s), raw pairs/s at
  256² (batch 32/128/256), the end-to-end service at several concurrency levels with real JPEG uploads
  (clients on the same machine's CPUs) and the same with 1, 4 and 8 replica processes sharing the device
  (the serving shape), and writes ``gpu-check.json`` and ``gpu-check.log`` into ``--out``.
  ``--dry-run`` does the same on the CPU with tiny sizes (the test suite runs it, so it cannot rot).

    make gpu-bundle                                   # here
    python3 -m benchmarks.gpu_check run --out $OUT    # on the device (make gpu-check OUT=...)

Only the standard library is imported at the top: on the device the service's dependencies exist only
after the wheels are installed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: ``../shared`` here; on the device the bundle's copy (set by :func:`run`).
SHARED = Path(os.environ.get("RLPIPS_SHARED_DIR") or ROOT.parent / "shared")
log = logging.getLogger("gpu_check")

#: Distributions the device lacks (its image has torch, torchvision, numpy, pillow, httpx, anyio, h11,
#: click, prometheus-client, safetensors, tqdm, matplotlib, pytest, hypothesis, pyyaml, uvloop…).
WHEELS = (
    "fastapi",
    "opentelemetry-api",
    "starlette",
    "pydantic",
    "pydantic-core",
    "pydantic-settings",
    "python-dotenv",
    "typing-inspection",
    "annotated-types",
    "uvicorn",
    "httptools",
    "python-multipart",
    "pytest-asyncio",
    "asgi-lifespan",
)
WEIGHTS = (
    "alexnet-features.pth",
    "lpips-v0.1-alex-lin.pth",
    "squeezenet1_1-features.pth",
    "lpips-v0.1-squeeze-lin.pth",
)
SAMPLE_JPEGS = 96
KODAK = ("kodim01.png", "kodim03.png", "kodim04.png", "kodim05.png", "kodim23.png")


# -- bundle (here) ---------------------------------------------------------------------------------


def bundle(dest: Path) -> None:
    """Fill ``dest`` with wheels, weights, golden pairs and sample images (see the module docstring)."""
    wheels = dest / "wheels"
    shutil.rmtree(dest, ignore_errors=True)
    wheels.mkdir(parents=True)
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]
    platforms = [f"--platform=manylinux_2_{n}_x86_64" for n in (17, 27, 28, 34, 35)]
    platforms.append("--platform=manylinux2014_x86_64")
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version=3.12", "--implementation=cp", *platforms, "-d", str(wheels), *pins]  # fmt: skip
    subprocess.run(cmd, check=True)
    shared = dest / "shared"
    (shared / "weights").mkdir(parents=True)
    for name in WEIGHTS:
        shutil.copy2(SHARED / "weights" / name, shared / "weights" / name)
    shutil.copytree(SHARED / "golden", shared / "golden")
    jpegs = shared / "images" / "imagenet-sample"
    jpegs.mkdir(parents=True)
    for f in sorted((SHARED / "images" / "imagenet-sample").glob("*.JPEG"))[:SAMPLE_JPEGS]:
        shutil.copy2(f, jpegs / f.name)
    (shared / "images" / "kodak24").mkdir()
    for name in KODAK:
        shutil.copy2(SHARED / "images" / "kodak24" / name, shared / "images" / "kodak24" / name)
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"bundle {dest}: {len(list(wheels.iterdir()))} wheels, {size / 2**20:.1f} MiB in all")


# -- run (there) -----------------------------------------------------------------------------------


def install(bundle_dir: Path) -> dict[str, str]:
    """Make the service importable: the bundle's wheels into ``BUNDLE/site`` (unless the service's
    dependencies import already), then the environment for subprocesses."""
    site = bundle_dir / "site"
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        wheels = sorted(str(p) for p in (bundle_dir / "wheels").glob("*.whl"))
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
               "--no-compile", "--upgrade", "--target", str(site), *wheels]  # fmt: skip
        subprocess.run(cmd, check=True)
        sys.path.insert(0, str(site))
    paths = [str(site), str(ROOT), os.environ.get("PYTHONPATH", "")]
    return {"PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda_version"] = torch.version.cuda
    return info


def gpu_tests(env: dict[str, str], dry: bool, out: Path) -> dict[str, Any]:
    """``pytest -m gpu`` (a dry run only collects them: they fail without CUDA by design)."""
    files = ["tests/unit/test_attacks.py", "tests/unit/test_precision.py"]  # the gpu tests' files
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", *files]
    cmd += ["--collect-only"] if dry else [f"--junitxml={out / 'gpu-tests.xml'}"]
    t0 = time.perf_counter()
    run = subprocess.run(cmd, cwd=ROOT, env=os.environ | env, capture_output=True, text=True)
    log.info("pytest -m gpu:\n%s", run.stdout[-4000:] + run.stderr[-2000:])
    return {"returncode": run.returncode, "seconds": round(time.perf_counter() - t0, 1),
            "summary": (run.stdout.strip().splitlines() or [""])[-1]}  # fmt: skip


def parity(device: str, sizes: tuple[int | None, ...]) -> dict[str, Any]:
    """Max |d - d_fp32(CPU)| over the golden pairs per trunk precision on ``device``."""
    import torch

    from app.imaging import load_tensor
    from app.metric.engine import Engine
    from app.metric.queries import Image, Query
    from app.metric.store import ModelStore

    store = ModelStore(weights_dir=SHARED / "weights")
    expected = json.loads((SHARED / "golden" / "expected.json").read_text())
    pairs = _golden_pairs(expected)
    models = ["lpips-alex", "lpips-squeeze"]
    out: dict[str, Any] = {}
    for size in sizes:
        cpu = Engine(store, models, torch.device("cpu"), size or 64, precision=torch.float32)
        cpu.load()
        for name, dtype in (
            ("fp16", torch.float16),
            ("bf16", torch.bfloat16),
            ("fp32", torch.float32),
        ):
            eng = Engine(store, models, torch.device(device), size or 64, precision=dtype)
            eng.load()
            worst = 0.0
            for a, b in pairs:
                ta, tb = (load_tensor((SHARED / "golden" / p).read_bytes(), size) for p in (a, b))
                qs = [Query(m, Image(ta, a), (Image(tb, b),)) for m in models]
                got, ref = eng.compute(qs, use_cache=False), cpu.compute(qs, use_cache=False)
                worst = max(
                    worst,
                    *(abs(g.distances[0] - r.distances[0]) for g, r in zip(got, ref, strict=True)),
                )
            out[f"{name}@{size or 'native'}"] = worst
    return out


def _device_decode(device: str, size: int, images: int) -> dict[str, Any]:
    """JPEG decode + resize on ``device`` against the Pillow path (benchmarks/device_decode.py)."""
    from benchmarks.device_decode import measure

    return measure(device, size, images, SHARED)


def _service(*args: Any) -> dict[str, Any]:
    from benchmarks.gpu_service import service

    return service(SHARED, *args)


def _replicas(*args: Any) -> dict[str, Any]:
    from benchmarks.gpu_service import replicas

    return replicas(SHARED, *args)


def _golden_pairs(expected: dict[str, Any]) -> list[tuple[str, str]]:
    """The (reference, distorted) paths of ``expected.json``, relative to the golden folder."""
    ex = expected["lpips_examples"]
    pairs = [(ex["reference"], f"lpips_examples/{n}.png") for n in ex["pairs"]]
    pairs += [
        (f"tid2013/ref/{n}.bmp", f"tid2013/dist/{n}.bmp") for n in expected["tid2013"]["pairs"]
    ]
    return pairs


def raw_throughput(
    device: str, resolution: int, batches: tuple[int, ...], seconds: float
) -> dict[str, Any]:
    """Pairs/s of the engine (default precision for the device, channels-last) on distinct images."""
    import torch

    from app.config import resolve_precision
    from app.imaging import load_tensor
    from app.metric.engine import Engine
    from app.metric.queries import Image, Query
    from app.metric.store import ModelStore

    store = ModelStore(weights_dir=SHARED / "weights")
    dev = torch.device(device)
    engine = Engine(
        store, ["lpips-alex"], dev, resolution, precision=resolve_precision("auto", dev)
    )
    engine.load()
    files = sorted((SHARED / "images" / "imagenet-sample").glob("*.JPEG"))
    tensors = [load_tensor(f.read_bytes(), resolution) for f in files]
    out: dict[str, Any] = {"precision": str(engine.precision).removeprefix("torch.")}
    serial = iter(range(1 << 62))

    def batch_of(n: int) -> list[Query]:
        """``n`` pairs of distinct keys (so every image is a trunk pass, as for distinct uploads)."""
        return [
            Query("lpips-alex", Image(tensors[(2 * i) % len(tensors)], f"r{next(serial)}"),
                  (Image(tensors[(2 * i + 1) % len(tensors)], f"c{next(serial)}"),))
            for i in range(n)
        ]  # fmt: skip

    for n in batches:
        work = [batch_of(n) for _ in range(4)]
        for qs in work[:2]:  # warm-up (cuDNN picks kernels per batch size)
            engine.compute(qs, use_cache=False)
        pairs, started, k = 0, time.perf_counter(), 0
        while time.perf_counter() - started < seconds:
            engine.compute(
                work[k % len(work)], use_cache=False
            )  # returns host floats: synchronised
            pairs += n
            k += 1
        out[f"batch_{n}"] = round(pairs / (time.perf_counter() - started), 1)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s",
        handlers=[logging.FileHandler(out / "gpu-check.log"), logging.StreamHandler()],
    )  # fmt: skip
    started = time.perf_counter()
    global SHARED
    if not (SHARED / "weights").is_dir():  # the device: no ../shared, the bundle carries it
        SHARED = Path(args.bundle) / "shared"
    env = install(Path(args.bundle)) | {
        "RLPIPS_SHARED_DIR": str(SHARED),
        "RLPIPS_WEIGHTS_DIR": str(SHARED / "weights"),
    }
    os.environ.update(env)
    dry = args.dry_run
    device = "cpu" if dry else "cuda"
    report: dict[str, Any] = {"command": "python -m benchmarks.gpu_check " + " ".join(sys.argv[1:]),
                              "dry_run": dry, "machine": machine()}  # fmt: skip

    def step(name: str, fn: Any, *a: Any) -> None:
        t0 = time.perf_counter()
        try:
            report[name] = fn(*a)
        except Exception as exc:  # one failed step must not cost the others (the lease is short)
            log.exception("step %s failed", name)
            report[name] = {"error": repr(exc)}
        log.info("%s done in %.1f s: %s", name, time.perf_counter() - t0, report[name])
        (out / "gpu-check.json").write_text(json.dumps(report, indent=2) + "\n")

    step("gpu_tests", gpu_tests, env, dry, out)
    step("parity", parity, device, (None,) if dry else (None, 256))
    step("device_decode", _device_decode, device, 64 if dry else 256, 8 if dry else 96)
    step(
        "raw",
        raw_throughput,
        device,
        64 if dry else 256,
        (4, 8) if dry else (32, 128, 256),
        0.5 if dry else 5.0,
    )
    levels = [(1, 4)] if dry else [(1, 16), (4, 64), (8, 256)]
    step("service", _service, env, dry, levels, 1.0 if dry else 12.0, out)
    # the serving shape (issue 15): K replica processes sharing the device, clients spread over them;
    # then the same with JPEGs decoded on the device in each micro-batch (nvJPEG; opt-in)
    shapes = (1, 2) if dry else (1, 4, 8)
    level = (2, 4) if dry else (8, 256)
    for name, extra in (
        ("replicas", {}),
        ("replicas_device_decode", {"RLPIPS_DECODE_DEVICE": "device"}),
    ):
        step(name, _replicas, env, dry, shapes, level, 1.0 if dry else 10.0, out, extra)
    report["seconds"] = round(time.perf_counter() - started, 1)
    (out / "gpu-check.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bundle", help="here: wheels, weights, golden pairs, sample images")
    b.add_argument("--dest", default=str(ROOT / ".gpu"))
    r = sub.add_parser("run", help="there: the check, results into --out")
    r.add_argument("--out", required=True)
    r.add_argument("--bundle", default=str(ROOT / ".gpu"))
    r.add_argument("--dry-run", action="store_true", help="on the CPU, tiny sizes")
    args = p.parse_args()
    if args.command == "bundle":
        bundle(Path(args.dest))
    else:
        run(args)


if __name__ == "__main__":
    main()
