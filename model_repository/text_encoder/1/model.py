"""`text_encoder`: prompt (and negative prompt) -> umT5 embeddings, with a prompt cache.

Adapter only: `flashportrait.serving.services.TextEncoderService` does the work (contract:
model_repository/README.md). Request parameters (the generation parameters an ensemble passes to
every step) are not this model's and are ignored.
"""

import triton_python_backend_utils as pb_utils

from flashportrait.sampling.params import DEFAULT_NEGATIVE_PROMPT
from flashportrait.serving.adapters import respond_each, text_input, torch_threads
from flashportrait.serving.metrics import FAILURES, ModelMetrics
from flashportrait.serving.services import TextEncoderService
from flashportrait.serving.settings import TextEncoderSettings, model_settings, resolve_deployment


class TritonPythonModel:
    def initialize(self, args):
        settings = model_settings(TextEncoderSettings, args)
        torch_threads(settings.threads)
        deployment = resolve_deployment(settings, args)
        self.service = TextEncoderService(settings, deployment)
        self.metrics = ModelMetrics.for_model(args, (FAILURES,))
        pb_utils.Logger.log_info(
            f"text_encoder: umT5 from {deployment.weights} on {deployment.device} ({deployment.dtype})"
        )

    def _handle(self, request):
        prompt = text_input(request, "PROMPT")
        negative = text_input(request, "NEGATIVE_PROMPT", default=DEFAULT_NEGATIVE_PROMPT)
        return self.service.encode(prompt, negative)

    def execute(self, requests):
        return respond_each(requests, self._handle, self.metrics)
