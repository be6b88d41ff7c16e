"""Intra-op threads × batch size for the plain model (``lpips-alex``), random inputs, median of repeats.

Run it once per thread count (torch's thread pool is set at start):

    python -m benchmarks.threads --threads 1 --resolution 64
    python -m benchmarks.threads --threads 2 --resolution 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from app.config import Settings


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batches", default="1,4,16,32")
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    metric = Settings().store().load("lpips-alex")
    gen = torch.Generator().manual_seed(0)
    out = {}
    for n in (int(b) for b in args.batches.split(",")):
        r = args.resolution
        x0 = torch.rand(n, 3, r, r, generator=gen) * 2 - 1
        x1 = torch.rand(n, 3, r, r, generator=gen) * 2 - 1
        times = []
        with torch.inference_mode():
            metric(x0, x1)
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                metric(x0, x1)
                times.append(time.perf_counter() - t0)
        out[n] = n / statistics.median(times)
    print(json.dumps({"threads": args.threads, "resolution": args.resolution, "pairs_per_s": out}))


if __name__ == "__main__":
    main()
