"""How far Pillow's JPEG ``draft`` (DCT-domain downscaling) moves LPIPS distances versus full decoding.

Distances of ``--pairs`` ImageNet pairs after full decode + antialiased resize versus
``load_tensor(..., draft=True)`` (decode at the smallest DCT scale still at least
the working resolution, then the same resize); prints per resolution the largest, 99th-percentile and
median absolute change and the decode CPU milliseconds per image of both.

    python -m benchmarks.draft_decode --pairs 100
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from app.config import Settings
from app.imaging import load_tensor
from benchmarks.loadgen import IMAGENET


def _decode_all(data: list[bytes], size: int, draft: bool) -> tuple[torch.Tensor, float]:
    """``([N, 3, size, size], CPU ms per image)``."""
    t0 = time.thread_time()
    x = torch.stack([load_tensor(d, size, draft=draft) for d in data])
    return x, 1000 * (time.thread_time() - t0) / len(data)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--pairs", type=int, default=100)
    p.add_argument("--resolutions", default="64,256")
    args = p.parse_args()
    metric = Settings().store().load("lpips-alex")
    files = sorted(IMAGENET.glob("*.JPEG"))[: 2 * args.pairs]
    data = [f.read_bytes() for f in files]
    out = {}
    for size in (int(r) for r in args.resolutions.split(",")):
        full, full_ms = _decode_all(data, size, draft=False)
        fast, fast_ms = _decode_all(data, size, draft=True)
        with torch.inference_mode():
            change = (metric(full[0::2], full[1::2]) - metric(fast[0::2], fast[1::2])).abs()
        out[size] = {
            "max": float(change.max()),
            "p99": float(change.quantile(0.99)),
            "median": float(change.median()),
            "full_decode_ms": full_ms,
            "draft_decode_ms": fast_ms,
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
