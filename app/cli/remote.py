"""``rlpips distance --url URL``: the same command answered by a running service, through the Python
client (``clients/python``, distribution ``rlpips-client``) instead of a model loaded here.

The output is the local command's: the distance with six decimals, or with ``--json`` one line
``{"model", "distance", "per_layer", "resolution"}`` (the service's working resolution). Exit status 2
for a request the service refused (4xx: bad image, unknown model, missing key …), 1 when the service
failed or could not be reached after the client's retries.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def add_remote_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--url",
        help="ask a running service (e.g. http://127.0.0.1:8000) instead of loading the model here; "
        "--resolution and --device then do not apply (the service's settings do)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("RLPIPS_API_KEY"),
        help="API key for --url (default: $RLPIPS_API_KEY)",
    )


def cmd_remote_distance(args: argparse.Namespace) -> int:
    """``rlpips distance --url``: one pair scored by the service at ``args.url``."""
    from rlpips_client import Client, ClientError, RLPIPSError  # a separate distribution: lazy

    spatial = args.spatial is not None
    try:
        with Client(args.url, api_key=args.api_key) as client:
            res = client.distance(
                Path(args.image_a),
                [Path(args.image_b)],
                model=args.model,
                spatial=spatial,
                per_layer=True,
            )
    except RLPIPSError as exc:
        where = f" ({exc.field})" if exc.field else ""
        print(f"rlpips: error: {exc.code}{where}: {exc.message}", file=sys.stderr)
        return 2 if isinstance(exc, ClientError) else 1
    pair = res.results[0]
    if spatial and pair.spatial_png is not None:
        Path(args.spatial).write_bytes(pair.spatial_png)
    if args.json:
        out = {
            "model": res.model,
            "distance": pair.distance,
            "per_layer": list(pair.per_layer or ()),
            "resolution": list(res.resolution),
        }
        print(json.dumps(out))
    else:
        print(f"{pair.distance:.6f}")
    return 0
