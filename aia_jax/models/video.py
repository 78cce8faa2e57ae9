"""The release's `VideoNet`: backbone, dropout, classifier, consensus; and the name grammar.

A name is `<BACKBONE>[_<PLACEMENT>[_BN]]` with BACKBONE in C2D (TSN), TSM or I3D and PLACEMENT
one of the eleven of the release, e.g. `TSM`, `TSM_CinST_BN`, `C2D_STinCplusCinST`, `I3D_CinST`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from aia_jax.models.attention import DEFAULT_IMPL, IMPLS, PLACEMENTS
from aia_jax.models.layers import Dropout
from aia_jax.models.resnet import STAGE_SIZES, TEMPORAL_FORMS, ResNet, check_shift_place

Dtype = Any


@dataclasses.dataclass(frozen=True)
class ModelName:
    """A parsed release name: the temporal form and the attention placement."""

    form: str
    placement: str

    @property
    def canonical(self) -> str:
        """The name as `valid_names` lists it: `TSM`, or `TSM_CinST_BN` with a placement."""
        return self.form if self.placement == "none" else f"{self.form}_{self.placement}_BN"


def valid_names() -> list[str]:
    """Every name `create` accepts, in canonical form (`_BN` may also be left out)."""
    return [ModelName(f, p).canonical for f in TEMPORAL_FORMS for p in PLACEMENTS]


def parse_name(name: str) -> ModelName:
    """Parses `TSM_CinST_BN`-style names; raises ValueError listing the valid ones."""
    parts = name.split("_")
    if len(parts) > 1 and parts[-1] == "BN":
        parts = parts[:-1]
    form = parts[0]
    placement = "_".join(parts[1:]) or "none"
    # 'none' is not spelt out, and `_BN` belongs to a placement (the release's `TSM_CinST_BN`):
    # `TSM_BN` is no release name, and likely one whose placement was lost.
    named_none = name != form and placement == "none"
    if form not in TEMPORAL_FORMS or placement not in PLACEMENTS or named_none:
        raise ValueError(f"unknown model name {name!r}; valid names: {', '.join(valid_names())}")
    return ModelName(form, placement)


class VideoNet(nn.Module):
    """Clips `[B, T, H, W, 3]` (normalised) → logits `[B, num_classes]`.

    Logits are float32, or float64 for a float64 network (`dtype=jnp.float64` under x64).

    2D forms (C2D, TSM): frames through the ResNet, dropout, `new_fc` per frame, average over T
    (the release's "avg consensus"); T must be `num_segments`. I3D: global space-time pooling,
    dropout, `new_fc`; any T works (`num_segments` is the clip length the data pipeline, predict
    and export use). With dropout 0 the classifier is the backbone's `fc`, as the release places
    it.
    """

    num_classes: int
    form: str = "TSM"
    placement: str = "none"
    num_segments: int = 8
    depth: int = 50
    width: int = 64
    dropout: float = 0.5
    shift_place: str = "blockres"
    partial_bn: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = DEFAULT_IMPL
    remat: bool = False

    @nn.compact
    def __call__(self, clips: jax.Array, *, train: bool) -> jax.Array:
        # The 2D forms regroup frames into clips of num_segments (shift, gates, consensus); the
        # 3D form's convolutions and pooling take any T, num_segments being its data's clip length.
        if self.form == "I3D":
            frames_ok, want = clips.ndim == 5 and clips.shape[1] >= 1, "[B, T, H, W, 3], T >= 1"
        else:
            frames_ok = clips.ndim == 5 and clips.shape[1] == self.num_segments
            want = f"[B, {self.num_segments}, H, W, 3] (T = num_segments for {self.form})"
        if not frames_ok or clips.shape[-1] != 3:
            raise ValueError(f"expected clips {want}, got shape {clips.shape}")
        if not jnp.issubdtype(clips.dtype, jnp.floating):
            raise ValueError(
                f"expected floating-point clips, normalised as the release's "
                f"(aia_jax.data.normalize), got {clips.dtype}"
            )
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        b, t = clips.shape[:2]
        head_in_base = self.dropout == 0
        frames = clips if self.form == "I3D" else clips.reshape(b * t, *clips.shape[2:])
        x = ResNet(
            depth=self.depth,
            width=self.width,
            form=self.form,
            num_segments=self.num_segments,
            attention=self.placement,
            shift_place=self.shift_place,
            num_classes=self.num_classes if head_in_base else None,
            # The release's TSN initialises its classifier so wherever it sits (`new_fc` below).
            fc_init=nn.initializers.normal(0.001),
            partial_bn=self.partial_bn,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            attention_impl=self.attention_impl,
            remat=self.remat,
            name="base_model",
        )(frames, train=train)
        if not head_in_base:
            x = Dropout(self.dropout)(x, deterministic=not train)
            x = nn.Dense(
                self.num_classes,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=nn.initializers.normal(0.001),
                name="new_fc",
            )(x)
        # float32 logits for a bf16 network, float64 ones for a float64 network.
        x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        if self.form != "I3D":
            x = x.reshape(b, t, self.num_classes).mean(axis=1)
        return x


def create(
    name: str,
    *,
    num_classes: int,
    num_segments: int = 8,
    depth: int = 50,
    width: int = 64,
    dropout: float = 0.5,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    shift_place: str = "blockres",
    partial_bn: bool = False,
    attention_impl: str = DEFAULT_IMPL,
    remat: bool = False,
) -> VideoNet:
    """Builds a network from a release name.

    Args:
      name: `C2D`, `TSM`, `TSM_CinST_BN`, `C2D_STinCplusCinST`, `I3D_CinST_BN`, ….
      num_classes: classifier size.
      num_segments: frames per clip T.
      depth: 50 or 101 (the release), or 14 (one block per stage: tests and CPU runs).
      width: stem width; 64 in the release.
      dropout: before the classifier; 0 puts the classifier at `base_model/fc`.
      dtype: compute dtype (e.g. `jnp.bfloat16`); logits and BatchNorm statistics stay float32.
      param_dtype: parameter storage dtype.
      shift_place: TSM only, 'blockres' (the release) or 'block'.
      partial_bn: TSN's partial BN (see `ResNet`); off in the release's recipes.
      attention_impl: 'fused' (default: hand-written gradients, measured in bench/RESULTS.md)
        or 'xla' (plain jnp + autodiff, the reference); the parameters are the same.
      remat: recompute each backbone block in the backward pass rather than keep its
        activations (see `ResNet`): less memory in training for more compute; same values.

    Returns:
      The `VideoNet` module; apply it as `module.apply(variables, clips, train=False)`.
    """
    spec = parse_name(name)
    if num_segments < 1:  # 0 used to fail as a modulo by zero when first applied
        raise ValueError(f"num_segments must be a positive integer, got {num_segments}")
    if depth not in STAGE_SIZES:
        raise ValueError(f"depth must be one of {sorted(STAGE_SIZES)}, got {depth}")
    check_shift_place(shift_place)
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if attention_impl not in IMPLS:
        raise ValueError(f"attention_impl must be one of {IMPLS}, got {attention_impl!r}")
    if remat not in (True, False):  # a string ('false') would be truthy
        raise ValueError(f"remat must be True or False, got {remat!r}")
    return VideoNet(
        num_classes=num_classes,
        form=spec.form,
        placement=spec.placement,
        num_segments=num_segments,
        depth=depth,
        width=width,
        dropout=dropout,
        shift_place=shift_place,
        partial_bn=partial_bn,
        attention_impl=attention_impl,
        remat=bool(remat),
        dtype=jnp.dtype(dtype),
        param_dtype=jnp.dtype(param_dtype),
    )
