"""The metrics registry on its own: the rejection reasons are complete, no ``_created`` series, the
process and platform collectors are in each app's registry, and gauges read nothing before a runtime."""

from __future__ import annotations

import re

from app.telemetry import REJECT_REASONS, Telemetry
from tests.support import ROOT
from tests.support.apiutil import metric


def test_reject_reasons_name_every_rejection_in_the_code() -> None:
    """Each ``rejected("…")`` literal in app/ is exported at 0 from the start (and nothing else)."""
    found = {
        reason
        for path in (ROOT / "app").rglob("*.py")
        for reason in re.findall(r'rejected\("(\w+)"\)', path.read_text())
    }
    assert found == set(REJECT_REASONS)


def test_a_fresh_registry_has_no_created_series_and_the_process_collectors() -> None:
    t = Telemetry()
    t.rejected("overloaded")
    t.pairs_done("m", 2)
    t.distances_returned("m", [0.1, 0.7])
    text = t.render().decode()
    assert "_created" not in text
    assert metric(text, "rlpips_rejected_total", reason="overloaded") == 1
    assert metric(text, "rlpips_distance_count", model="m") == 2
    assert metric(text, "process_cpu_seconds_total") > 0
    assert "python_info{" in text
    assert metric(text, "rlpips_ready") == 0 and metric(text, "rlpips_cache_entries") == 0


def test_registries_are_separate_per_app() -> None:
    a, b = Telemetry(), Telemetry()
    a.rejected("deadline")
    assert metric(b.render().decode(), "rlpips_rejected_total", reason="deadline") == 0
