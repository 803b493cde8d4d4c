"""Gauges computed from the node's state when Prometheus scrapes."""

from __future__ import annotations

from smtpcluster.metrics import clock_behind_s


def test_clock_behind_counts_only_a_lag_behind_the_spools_time() -> None:
    hour_ms = 3600 * 1000
    assert clock_behind_s(hour_ms + 90_000, 3600.0) == 90.0  # another node stamped 90 s ahead
    assert clock_behind_s(hour_ms, 3600.0 + 7) == 0.0  # idle: the spool's time stands still
