"""The metric: trunks, LPIPS heads, loaders and the model store (knows nothing of HTTP)."""

from app.metric.lpips import LPIPS, DistanceResult, Heads, check_images
from app.metric.trunks import TRUNK_SPECS, Trunk, TrunkArch, build_trunk

__all__ = [
    "LPIPS",
    "TRUNK_SPECS",
    "DistanceResult",
    "Heads",
    "Trunk",
    "TrunkArch",
    "build_trunk",
    "check_images",
]
