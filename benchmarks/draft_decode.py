"""How far Pillow's JPEG ``draft`` (DCT-domain downscaling) moves LPIPS distances versus full decoding.

Distances of ``--pairs`` ImageNet pairs after full decode + antialiased resize versus draft decode + the same
resize; prints the largest and median absolute change per resolution.

    python -m benchmarks.draft_decode --pairs 100
"""

from __future__ import annotations

import argparse
import json

import torch

from app.config import Settings
from app.imaging import load_tensor, open_image, resize, to_rgb, to_tensor
from benchmarks.loadgen import IMAGENET


def draft_tensor(data: bytes, size: int) -> torch.Tensor:
    """Like :func:`app.imaging.load_tensor`, but JPEGs decode at the smallest DCT scale ≥ ``size``."""
    img = open_image(data)
    img.draft("RGB", (size, size))
    return to_tensor(resize(to_rgb(img), size))


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
        full = torch.stack([load_tensor(d, size) for d in data])
        fast = torch.stack([draft_tensor(d, size) for d in data])
        with torch.inference_mode():
            change = (metric(full[0::2], full[1::2]) - metric(fast[0::2], fast[1::2])).abs()
        out[size] = {"max": float(change.max()), "median": float(change.median())}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
