"""Serving helpers: run a local Triton server and write decoupled, streaming Python models.

- `triton_env`: find `tritonserver` (the `nvidia-pytriton` wheel or a system install) and its environment.
- `server`: `TritonServer`, a local server on free ports, as a context manager.
- `serve`: the `flashportrait serve` subcommand.
- `streaming`: `run_stream`, the response loop of a decoupled model (cancellation, errors, final flag).
- `metrics`: `flashportrait_*` metric declarations, `ModelMetrics` for models, `scrape` for clients.
- `perf`: run the `perf_analyzer` binary of the `tritonclient` wheel and read its profile export.
"""
