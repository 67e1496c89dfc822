"""vitreg: find and remove artifact tokens in Vision Transformers with registers."""

from vitreg.artifacts import (
    DETECTION_METHODS,
    ArtifactRemoval,
    ArtifactReport,
    detect_artifacts,
    neighbourhood_minimum,
)
from vitreg.model_files import (
    ModelBuildError,
    ModelFileInfo,
    read_model_file,
    read_model_file_info,
    save_model_file,
)
from vitreg.models import (
    REGISTER_ENTRIES,
    add_registers,
    build_model,
    count_registers,
    depth,
    freeze_blocks,
    prefix_token_counts,
    register_entry_block,
    set_register_entry_block,
    trainable_parameter_names,
    trainable_parameters,
)
from vitreg.penalty import BlockOutputCapture, l2_norm_penalty
from vitreg.resolution import dinov2_resample_pos_embed, set_img_size
from vitreg.schedules import SCHEDULES, LambdaSchedule, lambda_at
from vitreg.taps import TapError, Taps, query_attention, run_taps

__all__ = [
    "DETECTION_METHODS",
    "REGISTER_ENTRIES",
    "SCHEDULES",
    "ArtifactRemoval",
    "ArtifactReport",
    "BlockOutputCapture",
    "LambdaSchedule",
    "ModelBuildError",
    "ModelFileInfo",
    "TapError",
    "Taps",
    "add_registers",
    "build_model",
    "count_registers",
    "depth",
    "detect_artifacts",
    "dinov2_resample_pos_embed",
    "freeze_blocks",
    "l2_norm_penalty",
    "lambda_at",
    "neighbourhood_minimum",
    "prefix_token_counts",
    "query_attention",
    "read_model_file",
    "read_model_file_info",
    "register_entry_block",
    "run_taps",
    "save_model_file",
    "set_img_size",
    "set_register_entry_block",
    "trainable_parameter_names",
    "trainable_parameters",
]
