"""Serving helpers: run a local Triton server and write decoupled, streaming Python models.

- `triton_env`: find `tritonserver` (the `nvidia-pytriton` wheel or a system install) and its environment.
- `server`: `TritonServer`, a local server on free ports, as a context manager.
- `serve`: the `flashportrait serve` subcommand.
- `streaming`: `run_stream`, the response loop of a decoupled model (cancellation, errors, final flag).
- `metrics`: `flashportrait_*` metric declarations, `ModelMetrics` for models, `scrape` for clients.
- `perf`: run the `perf_analyzer` binary of the `tritonclient` wheel and read its profile export.

The product's models (`model_repository/`, contracts in its README.md):
- `settings`: each model's config.pbtxt parameters, with environment fallbacks (weights, mode, ...).
- `services`, `sampler_service`: the models' work, importable and testable without a server.
- `adapters`, `media`: shared pieces of the `model.py` adapters; uploaded images.
- `repository`: the runtime repository (model_repository/ + the feature extractor's ONNX file).
- `local`: the embedded default, a local server for a weights folder.
- `perf_inputs`: perf_analyzer input data for the ensemble and the sampler.
"""
