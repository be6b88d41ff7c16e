"""Read weights in every supported layout into trunk states and head lists.

Layouts: torchvision state dicts (``features.N.*``, optional ``classifier.*``); LPIPS head files
(``lin{k}.model.1.weight``); full LPIPS / official R-LPIPS checkpoints (``net.sliceK.N.*`` + ``lin{k}.*``
+ duplicate ``lins.{k}.*``); and the project's safetensors bundle (``trunk.features.N.*``, ``heads.{k}``).
Pickle files are always read with ``weights_only=True`` onto the CPU.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

BUNDLE_FORMAT = "rlpips-bundle/1"
_SLICE = re.compile(r"^net\.slice\d+\.(\d+\..+)$")
_LIN = re.compile(r"^lin(\d+)\.model\.1\.weight$")
_LINS = re.compile(r"^lins\.(\d+)\.model\.1\.weight$")
_HEAD = re.compile(r"^heads\.(\d+)$")


class LayoutError(ValueError):
    """A weights file whose keys match none of the supported layouts."""


def read_state(path: Path) -> dict[str, Tensor]:
    """All tensors in ``path`` (``.safetensors`` or a ``torch.save`` pickle) on the CPU."""
    if path.suffix == ".safetensors":
        return dict(load_file(str(path), device="cpu"))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise LayoutError(
            f"{path.name}: expected a state dict of tensors, got {type(obj).__name__}"
        )
    return {str(k): v for k, v in obj.items()}


def trunk_state(state: Mapping[str, Tensor], source: str = "state") -> dict[str, Tensor]:
    """Trunk parameters renamed to torchvision's ``features.N.*`` from any supported layout."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith("features."):
            out[key] = value
        elif key.startswith("trunk.features."):
            out[key.removeprefix("trunk.")] = value
        elif m := _SLICE.match(key):
            out["features." + m.group(1)] = value
    if not out:
        raise LayoutError(
            f"{source}: no trunk weights found (expected 'features.N.*', 'net.sliceK.N.*' or "
            f"'trunk.features.N.*' keys; got {sorted(state)[:5]})"
        )
    return out


def _indexed(state: Mapping[str, Tensor], pattern: re.Pattern[str]) -> dict[int, Tensor]:
    return {int(m.group(1)): v for k, v in state.items() if (m := pattern.match(k))}


def head_weights(state: Mapping[str, Tensor], source: str = "state") -> list[Tensor]:
    """Head weights ``[1, C_l, 1, 1]`` in layer order from any supported layout."""
    heads = _indexed(state, _LIN) or _indexed(state, _HEAD)
    if not heads:
        raise LayoutError(
            f"{source}: no head weights found (expected 'lin{{k}}.model.1.weight' or 'heads.{{k}}' "
            f"keys; got {sorted(state)[:5]})"
        )
    if sorted(heads) != list(range(len(heads))):
        raise LayoutError(f"{source}: head indices {sorted(heads)} are not 0..{len(heads) - 1}")
    for k, dup in _indexed(state, _LINS).items():
        if k not in heads or not torch.equal(dup, heads[k]):
            raise LayoutError(f"{source}: duplicate head 'lins.{k}' differs from 'lin{k}'")
    return [heads[k].float() for k in range(len(heads))]


def save_bundle(
    path: Path,
    heads: Sequence[Tensor],
    trunk: Mapping[str, Tensor] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write heads (and optionally a ``features.N.*`` trunk state) as a safetensors bundle."""
    tensors = {f"heads.{k}": w.detach().float().cpu().contiguous() for k, w in enumerate(heads)}
    for key, value in (trunk or {}).items():
        tensors[f"trunk.{key}"] = value.detach().float().cpu().contiguous()
    meta = {"format": BUNDLE_FORMAT, **(metadata or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
