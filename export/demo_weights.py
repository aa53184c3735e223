"""Demo weights: a complete FlashPortrait weights folder at tiny sizes, in the release's exact layout.

    python -m flashportrait.export.demo_weights --out DIR [--seed N]

Every file of FrancisRing/FlashPortrait and Wan-AI/Wan2.1-I2V-14B-720P is written with the release's
name, format (torch pickle or safetensors, sharded where the release is), key layout and prefixes
(`golden/manifests/README.md`), at the sizes of `DeploymentConfig.tiny()` (stated in
`flashportrait_config.json` at the root, which is how the loader learns them). The demo and the tests
therefore load through exactly the code that loads the real release (`flashportrait.components`).
The face models are the real ONNX files shipped in `flashportrait/assets/face/`.

Weights are random, deterministic for a seed (each tensor has its own generator seeded from the seed,
the file and the key, so values do not depend on writing order), and scaled so the tiny pipeline's
activations stay finite and non-degenerate: matrices N(0, 1 / fan_in), biases N(0, 0.05^2), norm
scales 1 + N(0, 0.1^2), free parameters (modulations, class/position embeddings, resampler latents)
N(0, 1 / last dim). The motion encoder's BatchNorm statistics are measured on random crops (see
`calibrated_motion_encoder`) and the tiny decoder's last layer is scaled to mid-grey frames
(`calibrated_tiny_vae_decoder`). The LoRA's updates are about 5% of the weights.

Storage dtypes follow the release where known (`pd_fpg.pth` and `fast_vae.pth` fp16, the umT5 file bf16
as its name says); the Wan DiT shards, VAE and CLIP files are written in float32 and `transformer.pt`
and the LoRA in bf16, which was not checked against the real files (the loaders accept any float dtype).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import zlib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from flashportrait.export.demo_tokenizer import write_tokenizer

from flashportrait.components import DeploymentConfig, WeightPaths, wan_config_json
from flashportrait.components.layout import WAN_INDEX
from flashportrait.models.clip import build_clip_vision, unused_shapes
from flashportrait.models.dit_loading import flashportrait_only_keys
from flashportrait.models.lora import RELEASE_PREFIX
from flashportrait.models.motion_encoder import MotionEncoder, build_motion_encoder
from flashportrait.models.portrait_encoder import PortraitEncoder
from flashportrait.models.t5 import build_umt5_encoder
from flashportrait.models.tiny_vae import TinyVaeDecoder, encoder_shapes
from flashportrait.models.transformer import build_meta
from flashportrait.models.wan_vae import WanVAE
from flashportrait.weights import module_tensor_shapes, save_safetensors

WAN_SHARDS = 2  # the release has 7; two exercise the index and the cross-shard merge
LORA_RANK = 4  # the release's is 64 (the file name keeps "rank64", as the loader expects the name)
LORA_SCALE = 0.05  # size of a LoRA update relative to the weight it changes
# A random DiT's flow, amplified by the expression guidance (scale 4), drives the latents of a 4-step
# generation to std ~2.6, where both decoders saturate most pixels; a smaller output head keeps them
# near the unit scale of real latents.
DIT_HEAD_SCALE = 0.25
FRAME_STD = 0.2  # the tiny decoder's frames in [0, 1] (see calibrated_tiny_vae_decoder)
CALIBRATION_CROPS = 2  # random crops whose statistics become the motion encoder's BatchNorm statistics

# A tensor's spec: shape and dtype (integer buffers such as BatchNorm counters keep theirs).
Spec = tuple[tuple[int, ...], torch.dtype]

_FREE_PARAMETERS = ("modulation", "cls_embedding", "pos_embedding", "latents")


def _generator(seed: int, stream: str, key: str) -> torch.Generator:
    # The CPU generator (mt19937) keeps only 32 bits of its seed, so everything goes into the hash.
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{stream}/{key}".encode()))


def random_tensor(key: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """One float32 tensor, scaled by what the key is (see the module docstring)."""
    noise = torch.randn(shape, generator=gen)
    if key.endswith(".bias") or len(shape) == 0:
        return 0.05 * noise
    if key.endswith("gamma") or len(shape) == 1:
        return 1.0 + 0.1 * noise
    if key.endswith(_FREE_PARAMETERS):
        return noise * shape[-1] ** -0.5
    fan_in = 1
    for d in shape[1:]:
        fan_in *= d
    return noise * fan_in**-0.5


def random_state(
    specs: Mapping[str, Spec], *, seed: int, stream: str, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Random tensors for `specs`, floats stored in `dtype`, integer buffers zero."""
    out: dict[str, torch.Tensor] = {}
    for key, (shape, spec_dtype) in specs.items():
        if spec_dtype.is_floating_point:
            out[key] = random_tensor(key, shape, _generator(seed, stream, key)).to(dtype)
        else:
            out[key] = torch.zeros(shape, dtype=spec_dtype)
    return out


def module_specs(module: torch.nn.Module) -> dict[str, Spec]:
    """Names, shapes and dtypes of a module's state dict (works on the meta device)."""
    return {k: (tuple(v.shape), v.dtype) for k, v in module.state_dict(keep_vars=True).items()}


def _float_specs(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Spec]:
    return {k: (tuple(s), torch.float32) for k, s in shapes.items()}


def _save_pickle(tensors: Mapping[str, torch.Tensor], path: Path, *, wrap: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": dict(tensors)} if wrap else dict(tensors), path)


# ---- the files ----


def write_wan_dit(sizes: DeploymentConfig, paths: WeightPaths, seed: int) -> None:
    """config.json, the safetensors shards and their index: every DiT key but the emo projections."""
    folder = paths.wan_config.parent
    folder.mkdir(parents=True, exist_ok=True)
    paths.wan_config.write_text(json.dumps(wan_config_json(sizes.dit), indent=2, sort_keys=True) + "\n")
    specs = module_specs(build_meta(sizes.dit))
    emo = set(flashportrait_only_keys(sizes.dit))
    keys = [k for k in specs if k not in emo]
    state = random_state({k: specs[k] for k in keys}, seed=seed, stream="wan_dit", dtype=torch.float32)
    for key in ("head.head.weight", "head.head.bias"):
        state[key] *= DIT_HEAD_SCALE
    per_shard = -(-len(keys) // WAN_SHARDS)
    weight_map: dict[str, str] = {}
    for i in range(WAN_SHARDS):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{WAN_SHARDS:05d}.safetensors"
        chunk = keys[i * per_shard : (i + 1) * per_shard]
        save_safetensors({k: state[k] for k in chunk}, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / WAN_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def transformer_keys(sizes: DeploymentConfig) -> list[str]:
    """What the demo `transformer.pt` holds: the expression projections (which only FlashPortrait has)
    and, as a fine-tune of the blocks, every other `blocks.*` key; embeddings and head stay Wan's."""
    return [k for k in module_tensor_shapes(build_meta(sizes.dit)) if k.startswith("blocks.")]


def write_transformer(sizes: DeploymentConfig, paths: WeightPaths, seed: int) -> None:
    specs = module_specs(build_meta(sizes.dit))
    keys = transformer_keys(sizes)
    state = random_state(
        {k: specs[k] for k in keys}, seed=seed, stream="flashportrait_dit", dtype=torch.bfloat16
    )
    _save_pickle(state, paths.transformer, wrap=True)


def lora_targets(sizes: DeploymentConfig) -> dict[str, tuple[int, ...]]:
    """DiT parameters the demo LoRA changes: everything but the expression projections (the step
    distillation LoRA was trained on Wan, which has none)."""
    emo = set(flashportrait_only_keys(sizes.dit))
    return {k: s for k, s in module_tensor_shapes(build_meta(sizes.dit)).items() if k not in emo}


def write_fast_lora(sizes: DeploymentConfig, paths: WeightPaths, seed: int) -> None:
    """The release key format: `diffusion_model.<t>.lora_down.weight` [r, in] / `.lora_up.weight`
    [out, r] for matrices, `<t>.diff` for norm scales, `<t>.diff_b` for biases, `<t>.diff_m` for
    modulations; the 5-D patch embedding only gets its bias term."""
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in lora_targets(sizes).items():
        target, _, leaf = name.rpartition(".")
        gen = _generator(seed, "fast_lora", name)
        if leaf == "modulation":
            tensors[f"{RELEASE_PREFIX}{target}.diff_m"] = (
                LORA_SCALE * torch.randn(shape, generator=gen) * shape[-1] ** -0.5
            )
        elif leaf == "bias":
            tensors[f"{RELEASE_PREFIX}{target}.diff_b"] = (
                LORA_SCALE * 0.05 * torch.randn(shape, generator=gen)
            )
        elif len(shape) == 1:
            tensors[f"{RELEASE_PREFIX}{target}.diff"] = LORA_SCALE * 0.1 * torch.randn(shape, generator=gen)
        elif len(shape) == 2:
            out_dim, in_dim = shape
            # up @ down has std LORA_SCALE / sqrt(in): LORA_SCALE times the weight's own
            down = torch.randn(LORA_RANK, in_dim, generator=gen) * in_dim**-0.5
            up = torch.randn(out_dim, LORA_RANK, generator=gen) * (LORA_SCALE / LORA_RANK**0.5)
            tensors[f"{RELEASE_PREFIX}{target}.lora_down.weight"] = down
            tensors[f"{RELEASE_PREFIX}{target}.lora_up.weight"] = up
    save_safetensors({k: v.to(torch.bfloat16) for k, v in tensors.items()}, paths.fast_lora)


def write_portrait_encoder(sizes: DeploymentConfig, paths: WeightPaths, seed: int) -> None:
    """Flat dict, keys under `proj_model.` / `mouth_proj_model.` / `emo_proj_model.`, float32."""
    with torch.device("meta"):
        specs = module_specs(PortraitEncoder(sizes.portrait_encoder))
    _save_pickle(
        random_state(specs, seed=seed, stream="portrait_encoder", dtype=torch.float32), paths.portrait_encoder
    )


def calibrated_motion_encoder(sizes: DeploymentConfig, seed: int) -> dict[str, torch.Tensor]:
    """Random PD-FGC weights whose BatchNorm statistics are measured on random crops.

    With arbitrary statistics the eval-mode network's 40-odd BatchNorms do not normalise, and its
    features come out anywhere between 1e-2 and 1e3 and hardly depend on the input. Setting each
    BatchNorm's statistics to those of its input on a batch of crops (one train-mode pass, cumulative
    average) makes every feature O(1) and input dependent, as in a trained network.
    """
    config = sizes.motion_encoder
    state = random_state(module_specs(build_motion_encoder(config)), seed=seed, stream="motion_encoder",
                         dtype=torch.float32)  # fmt: skip
    model = MotionEncoder(config)
    model.load_state_dict(state)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative: after one batch, exactly that batch's statistics
    gen = _generator(seed, "motion_encoder", "calibration crops")
    # smooth random images (upsampled 8x8 noise), closer to face crops than pixel noise
    coarse = torch.rand(CALIBRATION_CROPS, 3, 8, 8, generator=gen) * 2 - 1
    crops = F.interpolate(coarse, size=(config.input_size, config.input_size), mode="bilinear")
    with torch.no_grad():
        model.train()(crops)
        for module in model.modules():
            # The heads' BatchNorm1d see one vector per crop: per-dimension variances of so few samples
            # (near zero where the ReLU before them was off for all 4) blow up other inputs. Their
            # second moment pooled over dimensions scales every input to O(1).
            if isinstance(module, torch.nn.BatchNorm1d):
                second_moment = module.running_var + module.running_mean.square()
                module.running_var.fill_(second_moment.mean().item())
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def write_motion_encoder(sizes: DeploymentConfig, paths: WeightPaths, seed: int) -> None:
    """`pd_fpg.pth`: the FanEncoder state dict (BatchNorm statistics and counters included), fp16."""
    state = calibrated_motion_encoder(sizes, seed)
    _save_pickle(
        {k: v.half() if v.is_floating_point() else v for k, v in state.items()}, paths.motion_encoder
    )


def calibrated_tiny_vae_decoder(sizes: DeploymentConfig, seed: int) -> dict[str, torch.Tensor]:
    """Random TAEHV decoder weights whose last conv is rescaled (per colour) so that unit-scale
    latents decode to frames of mean 0.5 and std `FRAME_STD` before the [0, 1] clamp: mid-grey
    frames with visible structure instead of mostly clamped pixels (their scale varies a lot from
    seed to seed otherwise)."""
    decoder = TinyVaeDecoder(sizes.tiny_vae)
    state = random_state(module_specs(decoder), seed=seed, stream="fast_vae", dtype=torch.float32)
    decoder.load_state_dict(state)
    gen = _generator(seed, "fast_vae", "calibration latents")
    latents = torch.randn(1, sizes.tiny_vae.latent_channels, 3, 8, 8, generator=gen)
    raw = decoder.decode_raw(latents, decoder.begin(1))  # [1, 3, t, H, W]
    mean, std = raw.mean(dim=(0, 2, 3, 4)), raw.std(dim=(0, 2, 3, 4))
    last = f"decoder.{len(decoder.decoder) - 1}"
    scale = FRAME_STD / std
    state[f"{last}.weight"] = state[f"{last}.weight"] * scale.view(-1, 1, 1, 1)
    state[f"{last}.bias"] = (state[f"{last}.bias"] - mean) * scale + 0.5
    return state


def write_fast_vae(sizes: DeploymentConfig, paths: WeightPaths, seed: int) -> None:
    """`fast_vae.pth`: TAEHV `encoder.*` (never used by FlashPortrait) and `decoder.*`, no prefix, fp16."""
    encoder = random_state(_float_specs(encoder_shapes(sizes.tiny_vae)), seed=seed, stream="fast_vae",
                           dtype=torch.float32)  # fmt: skip
    state = {**encoder, **calibrated_tiny_vae_decoder(sizes, seed)}
    _save_pickle({k: v.half() for k, v in state.items()}, paths.fast_vae)


def write_wan_vae(sizes: DeploymentConfig, paths: WeightPaths, seed: int) -> None:
    """`Wan2.1_VAE.pth`: encoder, conv1, conv2, decoder without the reference wrapper's `model.`."""
    with torch.device("meta"):
        specs = module_specs(WanVAE(sizes.wan_vae))
    _save_pickle(random_state(specs, seed=seed, stream="wan_vae", dtype=torch.float32), paths.wan_vae)


def write_t5(sizes: DeploymentConfig, paths: WeightPaths, seed: int) -> None:
    specs = module_specs(build_umt5_encoder(sizes.text_encoder))
    _save_pickle(random_state(specs, seed=seed, stream="t5", dtype=torch.bfloat16), paths.t5)


def write_clip(sizes: DeploymentConfig, paths: WeightPaths, seed: int) -> None:
    """The whole open-clip model without `model.`: `visual.*` (all blocks, post-norm, head),
    `textual.*` (the XLM-RoBERTa tower) and `log_scale`, as the release file holds them."""
    visual = {f"visual.{k}": s for k, s in module_tensor_shapes(build_clip_vision(sizes.clip)).items()}
    shapes = {**visual, **unused_shapes(sizes.clip, sizes.clip_text)}
    _save_pickle(
        random_state(_float_specs(shapes), seed=seed, stream="clip", dtype=torch.float32), paths.clip
    )


def copy_face_models(paths: WeightPaths) -> None:
    assets = resources.files("flashportrait") / "assets" / "face"
    for name, target in (
        ("face_det.onnx", paths.face_detector),
        ("face_landmark.onnx", paths.face_landmarks),
    ):
        target.parent.mkdir(parents=True, exist_ok=True)
        with resources.as_file(assets / name) as source:
            shutil.copyfile(source, target)


def write_demo_weights(
    out_dir: str | Path, *, seed: int = 0, sizes: DeploymentConfig | None = None
) -> WeightPaths:
    """Write every file of both releases at `sizes` (default `DeploymentConfig.tiny()`) under
    `out_dir`, plus `flashportrait_config.json`; returns the folder's `WeightPaths`. Existing files
    of the layout are overwritten."""
    sizes = sizes or DeploymentConfig.tiny()
    paths = WeightPaths.under(out_dir)
    paths.root.mkdir(parents=True, exist_ok=True)
    for stale in paths.wan_config.parent.glob("diffusion_pytorch_model*.safetensors"):
        stale.unlink()  # shards of an earlier, differently sharded write would be merged in
    write_wan_dit(sizes, paths, seed)
    write_wan_vae(sizes, paths, seed)
    write_t5(sizes, paths, seed)
    write_tokenizer(paths.tokenizer, vocab_size=sizes.text_encoder.vocab_size)
    write_clip(sizes, paths, seed)
    write_transformer(sizes, paths, seed)
    write_portrait_encoder(sizes, paths, seed)
    write_motion_encoder(sizes, paths, seed)
    copy_face_models(paths)
    write_fast_lora(sizes, paths, seed)
    write_fast_vae(sizes, paths, seed)
    paths.config.write_text(sizes.to_json())
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flashportrait.export.demo_weights",
        description="Write tiny random FlashPortrait + Wan2.1 weights in the release layout.",
    )
    parser.add_argument("--out", required=True, type=Path, help="weights folder to write")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    paths = write_demo_weights(args.out, seed=args.seed)
    size = sum(p.stat().st_size for p in paths.root.rglob("*") if p.is_file())
    print(
        f"demo weights written to {paths.root} ({size / 2**20:.1f} MiB, {time.perf_counter() - start:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
