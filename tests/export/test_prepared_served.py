"""A prepared folder (`prepare_weights`) is served by the real tritonserver and gives the outputs of the
release layout loaded directly (float32 storage: the same weights bit for bit)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flashportrait.client.client import FlashPortraitClient
from flashportrait.export.motion_encoder import torch_crop_encoder

from flashportrait.components import FEATURE_EXTRACTOR_PARTS, load_components
from flashportrait.demo import make_demo_media
from flashportrait.face import FaceFrontEnd, FaceFrontEndConfig
from flashportrait.serving.local import local_server
from flashportrait.serving.sampler_service import SamplerJob, SamplerService
from flashportrait.serving.services import TextEncoderService
from flashportrait.serving.settings import SamplerSettings, TextEncoderSettings, resolve_deployment
from tests.serving.product import PROMPT, SMALL, collect

pytestmark = pytest.mark.server
FRAMES = 13


def test_a_prepared_folder_is_served_with_the_release_outputs(prepared_f32, release, tmp_path):
    image_path, video_path = make_demo_media(tmp_path, FRAMES)
    image, video = image_path.read_bytes(), video_path.read_bytes()
    parameters = {**SMALL, "seed": 7, "progress": False}
    with (
        local_server(prepared_f32, config_name="cpu", cache_root=tmp_path / "cache") as server,
        FlashPortraitClient(server.grpc_url) as client,
    ):
        driving = client.features(video, request_id="prepared-features")
        prompt, _ = client.text_embeddings(PROMPT, "", request_id="prepared-text")
        served = collect(client.sample(image, driving.features, prompt, None, None, parameters, "prepared-1"))

    # The same models loaded from the release layout, in this process (float32 on the CPU, one thread
    # like the CPU server's models, so the float32 sums are the same).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        text_settings = TextEncoderSettings(weights=str(release.root), device="cpu", dtype="float32")
        text = TextEncoderService(text_settings, resolve_deployment(text_settings, env={}))
        np.testing.assert_array_equal(prompt, text.encode(PROMPT, "")["PROMPT_EMBEDS"])

        settings = SamplerSettings(weights=str(release.root), device="cpu", dtype="float32")
        sampler = SamplerService(settings, resolve_deployment(settings, env={}))
        job = SamplerJob(image, driving.features, prompt, parameters=parameters, label="request local")
        expected = np.concatenate([r["FRAMES"] for r in sampler.stream(job)])
    finally:
        torch.set_num_threads(threads)
    assert served.frames.shape == (FRAMES - 1, *expected.shape[1:]) and served.frames.std() > 1.0
    np.testing.assert_array_equal(served.frames, expected)

    # Features: the served ONNX export (from the prepared motion encoder) against the release's
    # PyTorch encoder on the same crops (ONNX Runtime vs PyTorch float32: 1e-4, as the export's parity).
    face = release.root / "FlashPortrait"
    front = FaceFrontEnd(FaceFrontEndConfig(str(face / "face_det.onnx"), str(face / "face_landmark.onnx")))
    crops = front.align_video(video).crops
    encoder = load_components(release.root, parts=FEATURE_EXTRACTOR_PARTS, dtype=torch.float32).motion_encoder
    np.testing.assert_allclose(driving.features, torch_crop_encoder(encoder)(crops), rtol=1e-4, atol=1e-4)
    assert driving.face_mask.all() and driving.features.shape == (FRAMES, 554)
