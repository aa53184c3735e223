"""`face_align`: driving video bytes -> aligned face crops, face mask and exact frame rate.

Adapter only: `flashportrait.serving.services.FaceAlignService` does the work (contract:
model_repository/README.md). Each request is answered on its own; a video that cannot be read, has
no frames, has no face or is too long is that request's `request <id>: <message>` error.
"""

import triton_python_backend_utils as pb_utils

from flashportrait.serving.adapters import bytes_input, respond_each
from flashportrait.serving.metrics import FAILURES, ModelMetrics
from flashportrait.serving.services import FaceAlignService
from flashportrait.serving.settings import FaceAlignSettings, model_settings, resolve_deployment


class TritonPythonModel:
    def initialize(self, args):
        settings = model_settings(FaceAlignSettings, args)
        deployment = resolve_deployment(settings, args)
        self.service = FaceAlignService(settings, deployment)
        self.metrics = ModelMetrics.for_model(args, (FAILURES,))
        pb_utils.Logger.log_info(
            f"face_align: face models from {deployment.weights} on {deployment.device}, "
            f"at most {settings.max_frames} frames per request"
        )

    def _handle(self, request):
        return self.service.align(bytes_input(request, "VIDEO"))

    def execute(self, requests):
        return respond_each(requests, self._handle, self.metrics)
