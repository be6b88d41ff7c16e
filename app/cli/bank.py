"""``rlpips bank create|info|delete|add|remove|search --url URL``: the known-items bank of a running
service, through the Python client (``rlpips-client``). Output: one JSON object per command; exit
status 2 for a request the service refused (4xx), 1 when it failed or could not be reached."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from app.config import Settings


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    bank = sub.add_parser("bank", help="known-items banks of a running service (--url)")
    ops = bank.add_subparsers(dest="bank_command", required=True)

    def op(name: str, help: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = ops.add_parser(name, help=help)
        p.add_argument("bank", help="bank name")
        p.add_argument("--url", required=True, help="the service, e.g. http://127.0.0.1:8000")
        p.add_argument(
            "--api-key",
            default=os.environ.get("RLPIPS_API_KEY"),
            help="API key (default: $RLPIPS_API_KEY)",
        )
        p.set_defaults(func=cmd_bank)
        return p

    p = op("create", "create a bank (or confirm one with the same settings)")
    p.add_argument("--model", help="default: the service's default model")
    p.add_argument("--threshold", type=float, help="default: the model's threshold")
    op("info", "a bank's settings, item count and bytes")
    op("delete", "delete a bank and its items")
    p = op("add", "add images; ids are the file names without extension unless --id is given")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--id", dest="ids", action="append", help="item id per image, in order")
    p = op("remove", "remove one item")
    p.add_argument("item", help="item id")
    p = op("search", "items within the threshold of an image, nearest first")
    p.add_argument("image", help="image file")
    p.add_argument("--threshold", type=float)
    p.add_argument("--limit", type=int)
    p.add_argument("--max-checked", type=int)
    p.add_argument("--mirror", action="store_true", help="also match mirrored copies")


def _run(args: argparse.Namespace) -> Any:
    from rlpips_client import Client  # a separate distribution: lazy

    with Client(args.url, api_key=args.api_key) as c:
        cmd = args.bank_command
        if cmd == "create":
            return c.bank_create(args.bank, args.model, args.threshold).raw
        if cmd == "info":
            return c.bank_info(args.bank).raw
        if cmd == "delete":
            c.bank_delete(args.bank)
            return {"deleted": args.bank}
        if cmd == "add":
            ids = args.ids or [Path(f).stem for f in args.images]
            if len(ids) != len(args.images):
                raise ValueError(f"{len(args.images)} images but {len(ids)} --id values")
            return c.bank_add(
                args.bank, {i: Path(f) for i, f in zip(ids, args.images, strict=True)}
            )
        if cmd == "remove":
            c.bank_remove(args.bank, args.item)
            return {"removed": args.item}
        res = c.bank_search(
            args.bank,
            Path(args.image),
            args.threshold,
            args.limit,
            max_checked=args.max_checked,
            mirror=args.mirror,
        )
        return res.raw


def cmd_bank(args: argparse.Namespace, settings: Settings) -> int:
    """One bank operation against ``args.url``; prints the answer as JSON."""
    from rlpips_client import ClientError, RLPIPSError

    try:
        out = _run(args)
    except RLPIPSError as exc:
        where = f" ({exc.field})" if exc.field else ""
        print(f"rlpips: error: {exc.code}{where}: {exc.message}", file=sys.stderr)
        return 2 if isinstance(exc, ClientError) else 1
    print(json.dumps(out))
    return 0
