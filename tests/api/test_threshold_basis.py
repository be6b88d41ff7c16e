"""Every threshold a response uses says where it came from: the caller's, or the model's default with the
false-match rate it was calibrated at (docs/CALIBRATION.md), or a store default not calibrated here."""

from __future__ import annotations

from pathlib import Path

from app.metric.store import ModelStore
from tests.support.apiutil import jpegs, multipart, serve, settings

ROOT = Path(__file__).resolve().parents[2]


async def test_distance_robustness_and_models_say_where_thresholds_come_from(
    weights_dir: Path,
) -> None:
    store = ModelStore(ROOT / "model_store")
    calibrated = store.model("lpips-alex")
    assert calibrated.calibration is not None and calibrated.calibration.false_match_rate == 1e-5
    a, b = jpegs(2, start=40)
    async with serve(settings(weights_dir)) as (client, _):
        r = (await client.post("/distance", files=multipart(a, b))).json()
        assert r["threshold"] == calibrated.threshold
        assert r["threshold_basis"] == {"source": "calibrated", "false_match_rate": 1e-5}
        r = (
            await client.post("/distance", files=multipart(a, b), data={"threshold": "0.3"})
        ).json()
        assert r["threshold"] == 0.3 and r["threshold_basis"] == {"source": "request"}
        form = {"models": "lpips-alex", "steps": "1"}
        r = (await client.post("/robustness-check", files=multipart(a, b), data=form)).json()
        [outcome] = r["results"]
        assert outcome["threshold"] == calibrated.threshold
        assert outcome["threshold_basis"]["source"] == "calibrated"
        models = {m["name"]: m for m in (await client.get("/models")).json()["models"]}
    assert models["lpips-alex"]["calibration"]["pairs"] == calibrated.calibration.pairs
    assert (
        models["lpips-vgg"]["calibration"] is None
    )  # weights not available offline: not calibrated
