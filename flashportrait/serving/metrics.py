"""`flashportrait_*` metrics: declared once, registered from a Python model, read back from `/metrics`.

Inside a model (Python backend), `ModelMetrics` wraps `pb_utils.MetricFamily`: Triton 2.51's Python
backend supports counters, gauges and histograms, and the values appear on the server's metrics port
(`--metrics-port`, Prometheus text format) next to Triton's own `nv_*` metrics, labelled with the
model's name and version. Every instance of a model process registers the same families and label
sets; Triton shares one time series between them, so counters add up over instances.

Outside, `scrape(url)` parses the metrics page into `{(name, labels): value}` for tests and tools.

`triton_python_backend_utils` only exists inside a model process, so it is imported inside methods.
"""

from __future__ import annotations

import dataclasses
import urllib.request
from collections.abc import Iterable, Mapping
from typing import Any, Literal

MetricKind = Literal["counter", "gauge", "histogram"]


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    """One metric family: Prometheus name (must start with `flashportrait_`), help text, kind, and for
    histograms the upper bucket bounds (seconds for `_seconds` metrics)."""

    name: str
    description: str
    kind: MetricKind
    buckets: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not self.name.startswith("flashportrait_"):
            raise ValueError(f"metric {self.name!r} must be named flashportrait_*")
        if (self.kind == "histogram") != bool(self.buckets):
            raise ValueError(f"metric {self.name!r}: buckets are required for histograms and only for them")


_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)

TIME_TO_FIRST_FRAME = MetricSpec(
    "flashportrait_time_to_first_frame_seconds",
    "Seconds from the start of execution of a streaming request to its first response being sent",
    "histogram",
    _LATENCY_BUCKETS,
)
WINDOW_COMPUTE = MetricSpec(
    "flashportrait_window_compute_seconds",
    "Seconds of compute per generated window (all denoising steps and the decode of that window)",
    "histogram",
    _LATENCY_BUCKETS,
)
FRAMES_GENERATED = MetricSpec(
    "flashportrait_frames_generated_total", "Video frames generated and sent to clients", "counter"
)
CANCELLATIONS = MetricSpec(
    "flashportrait_cancellations_total", "Streaming requests stopped because the client cancelled", "counter"
)
FAILURES = MetricSpec(
    "flashportrait_request_failures_total", "Requests that ended with an error response", "counter"
)
ACTIVE_GENERATIONS = MetricSpec(
    "flashportrait_active_generations",
    "Generations running now (a busy pod has a value above 0 even when its queue is empty)",
    "gauge",
)
STREAM_METRICS = (TIME_TO_FIRST_FRAME, CANCELLATIONS, FAILURES)
"""What `streaming.run_stream` records by itself."""
STANDARD_METRICS = (*STREAM_METRICS, WINDOW_COMPUTE, FRAMES_GENERATED)
SAMPLER_METRICS = (*STANDARD_METRICS, ACTIVE_GENERATIONS)
"""What the `sampler` model exports."""


class ModelMetrics:
    """The metrics of one model instance; call from `initialize` (never at import)."""

    def __init__(self, labels: Mapping[str, str], specs: Iterable[MetricSpec] = STANDARD_METRICS) -> None:
        import triton_python_backend_utils as pb_utils

        kinds = {
            "counter": pb_utils.MetricFamily.COUNTER,
            "gauge": pb_utils.MetricFamily.GAUGE,
            "histogram": pb_utils.MetricFamily.HISTOGRAM,
        }
        self._specs: dict[str, MetricSpec] = {}
        self._metrics: dict[str, Any] = {}
        # Families must outlive their metrics in the stub; keep references.
        self._families: list[Any] = []
        for spec in specs:
            family = pb_utils.MetricFamily(
                name=spec.name, description=spec.description, kind=kinds[spec.kind]
            )
            self._families.append(family)
            if spec.kind == "histogram":
                metric = family.Metric(labels=dict(labels), buckets=list(spec.buckets))
            else:
                metric = family.Metric(labels=dict(labels))
            self._specs[spec.name] = spec
            self._metrics[spec.name] = metric

    @classmethod
    def for_model(
        cls, args: Mapping[str, str], specs: Iterable[MetricSpec] = STANDARD_METRICS
    ) -> ModelMetrics:
        """Labelled with the model's name and version from `initialize(args)`."""
        return cls({"model": args["model_name"], "version": str(args["model_version"])}, specs)

    def _get(self, spec: MetricSpec | str, kind: MetricKind) -> Any:
        name = spec if isinstance(spec, str) else spec.name
        if name not in self._metrics:
            return None
        if self._specs[name].kind != kind:
            raise TypeError(f"{name} is a {self._specs[name].kind}, not a {kind}")
        return self._metrics[name]

    # Recording is a no-op for metrics this instance did not register, so core code can record
    # everything and each model chooses what it exports.
    def increment(self, spec: MetricSpec | str, value: float = 1.0) -> None:
        metric = self._get(spec, "counter")
        if metric is not None:
            metric.increment(value)

    def set(self, spec: MetricSpec | str, value: float) -> None:
        metric = self._get(spec, "gauge")
        if metric is not None:
            metric.set(value)

    def add(self, spec: MetricSpec | str, delta: float) -> None:
        """Add `delta` (may be negative) to a gauge; instances sharing the series add up correctly,
        where `set` from one instance would overwrite the others'."""
        metric = self._get(spec, "gauge")
        if metric is not None:
            metric.increment(delta)

    def observe(self, spec: MetricSpec | str, value: float) -> None:
        metric = self._get(spec, "histogram")
        if metric is not None:
            metric.observe(value)


MetricKey = tuple[str, frozenset[tuple[str, str]]]


def parse_prometheus(text: str) -> dict[MetricKey, float]:
    """Prometheus text format to `{(sample name, frozenset of (label, value))): value}`.

    Handles what Triton writes: `name{a="x",b="y"} 1.5` and `name 2`; comment lines are skipped.
    Label values with escaped quotes are not expected in Triton's output and are not supported.
    """
    samples: dict[MetricKey, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "{" in line:
            name, rest = line.split("{", 1)
            label_text, value_text = rest.rsplit("}", 1)
            labels = []
            for pair in filter(None, label_text.split(",")):
                key, value = pair.split("=", 1)
                labels.append((key.strip(), value.strip().strip('"')))
        else:
            name, value_text = line.split(None, 1)
            labels = []
        samples[(name.strip(), frozenset(labels))] = float(value_text.split()[0])
    return samples


def scrape(url: str, timeout_s: float = 5.0) -> dict[MetricKey, float]:
    """Fetch and parse a metrics page, e.g. `TritonServer.metrics_url`."""
    with urllib.request.urlopen(url, timeout=timeout_s) as reply:
        return parse_prometheus(reply.read().decode())


def sample(samples: Mapping[MetricKey, float], name: str, **labels: str) -> float:
    """The value of `name` summed over the series whose labels include `labels` (0.0 when none)."""
    wanted = set(labels.items())
    return sum(value for (key, series), value in samples.items() if key == name and wanted <= series)
