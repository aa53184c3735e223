"""`feature_extractor` as a Python model (the `configs/cpu.pbtxt` variant for servers without the
ONNX Runtime backend): the same exported `model.onnx` run through ONNX Runtime in this process.

Adapter only: `flashportrait.serving.services.FeatureExtractorService` does the work. The default
`config.pbtxt` serves the same file with Triton's ONNX Runtime backend instead of this file.
"""

from pathlib import Path

import triton_python_backend_utils as pb_utils

from flashportrait.serving.adapters import respond_each
from flashportrait.serving.metrics import FAILURES, ModelMetrics
from flashportrait.serving.services import FeatureExtractorService
from flashportrait.serving.settings import FeatureExtractorSettings, model_settings, resolve_deployment
from flashportrait.serving.streaming import input_array


class TritonPythonModel:
    def initialize(self, args):
        settings = model_settings(FeatureExtractorSettings, args)
        deployment = resolve_deployment(settings, args)
        version_dir = Path(args["model_repository"]) / str(args["model_version"])
        self.service = FeatureExtractorService(settings, deployment, version_dir)
        self.metrics = ModelMetrics.for_model(args, (FAILURES,))
        pb_utils.Logger.log_info(
            f"feature_extractor: {version_dir / settings.model_file} on {deployment.device}"
        )

    def _handle(self, request):
        return self.service.encode(input_array(request, "CROPS"))

    def execute(self, requests):
        return respond_each(requests, self._handle, self.metrics)
