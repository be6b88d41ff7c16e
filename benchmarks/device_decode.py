"""The device decode path (app/device_decode.py) against the Pillow path: distance parity and speed.

    python -m benchmarks.device_decode [--device cuda] [--size 256] [--images 100]

Parity: per model, max and mean |d_device − d_pillow| over consecutive ImageNet pairs (the sample's
first ``--images`` JPEGs), both paths feeding the same float32 metric on the CPU. Speed: images/s of
the Pillow path (one thread, as one decode lane) and of the device path in batches of 32 (whole
batch, synchronised). ``make gpu-check`` runs :func:`measure` on the device.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RLPIPS_SHARED_DIR") or ROOT.parent / "shared")
MODELS = ("lpips-alex", "r-lpips-alex-linf-synth")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(device: str, size: int, images: int, shared: Path | None = None) -> dict[str, Any]:
    """Parity and speed of the device path on ``device`` at ``size``² over ``images`` JPEGs."""
    from app.device_decode import accepts, decode_resize
    from app.imaging import load_tensor
    from app.metric.store import ModelStore

    root = shared or SHARED
    files = sorted((root / "images" / "imagenet-sample").glob("*.JPEG"))[: images - images % 2]
    datas = [d for d in (f.read_bytes() for f in files) if accepts(d)]
    datas = datas[: len(datas) - len(datas) % 2]
    dev = torch.device(device)
    t0 = time.perf_counter()
    pillow = torch.stack([load_tensor(d, size) for d in datas])
    pillow_s = time.perf_counter() - t0
    batches = [datas[i : i + 32] for i in range(0, len(datas), 32)]
    decode_resize(batches[0], size, dev)  # warm-up (nvJPEG handles, kernels)
    _sync(dev)
    t0 = time.perf_counter()
    on_device = torch.cat([decode_resize(b, size, dev) for b in batches])
    _sync(dev)
    device_s = time.perf_counter() - t0
    moved = on_device.cpu()
    out: dict[str, Any] = {
        "device": device,
        "size": size,
        "images": len(datas),
        "accepted": f"{len(datas)} of {len(files)}",
        "pixel_levels": {
            "max": round(float((moved - pillow).abs().max()) * 127.5, 2),
            "mean": round(float((moved - pillow).abs().mean()) * 127.5, 4),
        },
        "images_per_s": {
            "pillow_1_thread": round(len(datas) / pillow_s, 1),
            "device_batch_32": round(len(datas) / device_s, 1),
        },
    }
    store = ModelStore(weights_dir=root / "weights")
    metrics, skipped = store.load_shared(list(MODELS), "cpu", skip_unavailable=True)
    for name, metric in metrics.items():
        with torch.no_grad():
            a = metric.compare(pillow[0::2], pillow[1::2]).total
            b = metric.compare(moved[0::2], moved[1::2]).total
        diff = (a - b).abs()
        out[name] = {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean())}
    out["skipped_models"] = skipped
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    result = measure(args.device, args.size, args.images)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
