"""Argument types and option groups shared by the ``rlpips`` subcommands."""

from __future__ import annotations

import argparse
from fractions import Fraction

from app.attacks.pgd import NORMS


def resolution_arg(value: str) -> int | None:
    """``native`` → ``None``; a positive integer N → N (images resized to N×N)."""
    if value == "native":
        return None
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"resolution must be 'native' or an integer, got {value!r}"
        ) from None
    if not 16 <= n <= 4096:
        raise argparse.ArgumentTypeError(f"resolution must be between 16 and 4096, got {n}")
    return n


def fraction(value: str) -> float:
    """``"4/255"`` or ``"0.0157"`` → float."""
    try:
        return float(Fraction(value))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(
            f"expected a number or a fraction like 4/255, got {value!r}"
        ) from None


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


def add_attack_args(
    p: argparse.ArgumentParser, steps: int, step_size: float | None, epsilon_help: str
) -> None:
    """The PGD options shared by ``robustness`` and ``evaluate imagenet-attack``."""
    p.add_argument("--attack", choices=NORMS, default="linf", help="threat model (default linf)")
    p.add_argument(
        "--epsilon", type=float, help=f"radius in [0,1]-pixel units (default {epsilon_help})"
    )
    p.add_argument("--steps", type=int, default=steps, help=f"PGD steps (default {steps})")
    p.add_argument(
        "--step-size",
        type=float,
        default=step_size,
        help=f"step size in pixel units (default {step_size or '2.5*eps/steps'})",
    )
    p.add_argument("--seed", type=int, help="seed of the random start (default: fresh, reported)")
    p.add_argument("--no-random-start", action="store_true", help="start PGD at the clean image")
    add_device_arg(p)
