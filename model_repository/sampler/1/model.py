"""`sampler` (decoupled): reference image + features + text embeddings -> streamed video chunks.

Adapter only: `flashportrait.serving.sampler_service.SamplerService` does the work and
`flashportrait.serving.streaming.run_streams` runs the response loop (cancellation between
window-steps, per-request errors, the final flag on every path). One generation at a time per
instance, blocking inside `execute`, so Triton's queue metrics show the real backlog.
"""

import triton_python_backend_utils as pb_utils

from flashportrait.serving.adapters import bytes_input, torch_threads
from flashportrait.serving.metrics import SAMPLER_METRICS, ModelMetrics
from flashportrait.serving.sampler_service import SamplerJob, SamplerService
from flashportrait.serving.settings import SamplerSettings, model_settings, resolve_deployment
from flashportrait.serving.streaming import Stream, input_array, run_streams


class TritonPythonModel:
    def initialize(self, args):
        settings = model_settings(SamplerSettings, args)
        torch_threads(settings.threads)
        deployment = resolve_deployment(settings, args)
        self.service = SamplerService(settings, deployment)
        self.metrics = ModelMetrics.for_model(args, SAMPLER_METRICS)
        random = deployment.random_weights
        source = f"RANDOM {random} weights" if random else deployment.weights
        pb_utils.Logger.log_info(
            f"sampler: {deployment.mode} mode from {source} on {deployment.device} "
            f"({deployment.dtype}, memory {deployment.memory})"
        )

    def _produce(self, stream: Stream):
        request = stream.request
        job = SamplerJob(
            image=bytes_input(request, "IMAGE"),
            features=input_array(request, "FEATURES"),
            prompt_embeds=input_array(request, "PROMPT_EMBEDS"),
            negative_prompt_embeds=input_array(request, "NEGATIVE_PROMPT_EMBEDS", required=False),
            fps=input_array(request, "FPS", required=False),
            parameters=stream.parameters,
            label=stream.label,
        )
        return self.service.stream(job, stream.is_cancelled, pb_utils.Logger.log_info, self.metrics)

    def execute(self, requests):
        # The time to first frame is recorded at the first frames, not at the first (progress) response.
        run_streams(requests, self._produce, self.metrics, first_response_metric=False)
        return None
