"""Loading every model of a FlashPortrait deployment from a weights folder in the release layout.

`config.py`: `DeploymentConfig` (sizes of every model, presets `release()` and `tiny()`, JSON form).
`layout.py`: the folder layout, `WeightPaths` (every path overridable) and the missing-file check.
`loading.py`: `load_components(root, mode=..., parts=...)` -> `Components`.
"""

from flashportrait.components.config import DeploymentConfig, check_wan_config, wan_config_json
from flashportrait.components.layout import (
    ALL_PARTS,
    CONFIG_FILE,
    FACE_ALIGN_PARTS,
    FEATURE_EXTRACTOR_PARTS,
    FLASHPORTRAIT_DIR,
    MODES,
    PARTS,
    SAMPLER_PARTS,
    TEXT_ENCODER_PARTS,
    WAN_DIR,
    MissingWeightsError,
    WeightPaths,
    check_files,
    required_files,
)
from flashportrait.components.loading import Components, FaceModelPaths, load_components, resolve_config

__all__ = [
    "ALL_PARTS",
    "CONFIG_FILE",
    "FACE_ALIGN_PARTS",
    "FEATURE_EXTRACTOR_PARTS",
    "FLASHPORTRAIT_DIR",
    "MODES",
    "PARTS",
    "SAMPLER_PARTS",
    "TEXT_ENCODER_PARTS",
    "WAN_DIR",
    "Components",
    "DeploymentConfig",
    "FaceModelPaths",
    "MissingWeightsError",
    "WeightPaths",
    "check_files",
    "check_wan_config",
    "load_components",
    "required_files",
    "resolve_config",
    "wan_config_json",
]
