"""Metric declarations and the Prometheus text parser."""

from __future__ import annotations

import pytest

from flashportrait.serving.metrics import STANDARD_METRICS, MetricSpec, parse_prometheus, sample

PAGE = """# HELP flashportrait_cancellations_total Streaming requests stopped because the client cancelled
# TYPE flashportrait_cancellations_total counter
flashportrait_cancellations_total{model="sampler",version="1"} 2
flashportrait_cancellations_total{model="stream_chunks",version="1"} 1
flashportrait_time_to_first_frame_seconds_bucket{model="sampler",version="1",le="0.5"} 3
flashportrait_time_to_first_frame_seconds_bucket{model="sampler",version="1",le="+Inf"} 4
nv_cpu_memory_total_bytes 25169207296
"""


def test_parse_prometheus_reads_labels_and_values() -> None:
    samples = parse_prometheus(PAGE)
    key = ("flashportrait_cancellations_total", frozenset({("model", "sampler"), ("version", "1")}))
    assert samples[key] == 2.0
    assert sample(samples, "flashportrait_cancellations_total") == 3.0
    assert sample(samples, "flashportrait_cancellations_total", model="stream_chunks") == 1.0
    assert sample(samples, "flashportrait_time_to_first_frame_seconds_bucket", le="+Inf") == 4.0
    assert sample(samples, "nv_cpu_memory_total_bytes") == 25169207296.0
    assert sample(samples, "flashportrait_missing_total") == 0.0


def test_metric_specs_are_validated() -> None:
    assert all(spec.name.startswith("flashportrait_") for spec in STANDARD_METRICS)
    with pytest.raises(ValueError, match="flashportrait_"):
        MetricSpec("frames_total", "frames", "counter")
    with pytest.raises(ValueError, match="buckets"):
        MetricSpec("flashportrait_x_seconds", "x", "histogram")
    with pytest.raises(ValueError, match="buckets"):
        MetricSpec("flashportrait_x_total", "x", "counter", (1.0,))
