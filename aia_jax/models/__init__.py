"""Flax (linen) modules of the release: gates, units, placements, backbones and the video net."""

from aia_jax.models.attention import (
    DEFAULT_IMPL,
    IMPLS,
    PLACEMENTS,
    Attention,
    AttentionUnit,
    GateConv,
    apply_placement,
    pool_max_mean,
)
from aia_jax.models.resnet import (
    STAGE_SIZES,
    TEMPORAL_FORMS,
    Bottleneck,
    ResNet,
    carries_attention,
    frozen_by_partial_bn,
    i3d_inflates,
    temporal_shift,
)
from aia_jax.models.video import ModelName, VideoNet, create, parse_name, valid_names

__all__ = [
    "DEFAULT_IMPL",
    "IMPLS",
    "PLACEMENTS",
    "STAGE_SIZES",
    "TEMPORAL_FORMS",
    "Attention",
    "AttentionUnit",
    "Bottleneck",
    "GateConv",
    "ModelName",
    "ResNet",
    "VideoNet",
    "apply_placement",
    "carries_attention",
    "create",
    "frozen_by_partial_bn",
    "i3d_inflates",
    "parse_name",
    "pool_max_mean",
    "temporal_shift",
    "valid_names",
]
