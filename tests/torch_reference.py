"""Independent PyTorch re-implementation of the Attention-in-Attention release (ground truth).

Written from docs/official-aia.md only: module names, registration order and tensor layouts
reproduce the release's state-dict keys (see tests/data/official_keys/) and its computation, so
the Flax model can be checked against it number for number. Nothing here imports aia_jax.

Layout notes:
  * ``VideoNet.base_model`` is a torchvision-style ResNet v1.5; a bottleneck registers
    conv1, bn1, conv2, bn2, conv3, bn3, then its attention (``eft`` or ``eft1``/``eft2``) and
    ``downsample`` in the order of the release's state dicts: attention first in C2D nets,
    ``downsample`` first in TSM nets.
  * With dropout > 0 ``base_model.fc`` is a parameter-free ``nn.Dropout`` and the classifier is
    ``new_fc``; with dropout == 0 the classifier is ``base_model.fc`` and there is no ``new_fc``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
from torch import nn

STAGES: dict[int, tuple[int, int, int, int]] = {
    14: (1, 1, 1, 1),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
}

# placement -> (unit kinds in registration order, how they combine)
PLACEMENTS: dict[str, tuple[tuple[str, ...], str]] = {
    "C": (("C",), "single"),
    "ST": (("ST",), "single"),
    "CinST": (("CinST",), "single"),
    "STinC": (("STinC",), "single"),
    "C2ST": (("C", "ST"), "seq"),
    "ST2C": (("ST", "C"), "seq"),
    "CplusST": (("C", "ST"), "plus"),
    "CinST2STinC": (("CinST", "STinC"), "seq"),
    "STinC2CinST": (("STinC", "CinST"), "seq"),
    "STinCplusCinST": (("STinC", "CinST"), "plus"),
}

# Gates each unit owns, in the release's registration (state-dict) order: C first, then T, H, W.
UNIT_GATES: dict[str, tuple[str, ...]] = {
    "C": ("C",),
    "ST": ("T", "H", "W"),
    "CinST": ("C", "T", "H", "W"),
    "STinC": ("C", "T", "H", "W"),
}


def _depth_of(base_model: str) -> int:
    m = re.fullmatch(r"resnet(\d+)", base_model)
    if not m or int(m.group(1)) not in STAGES:
        raise ValueError(f"unknown base_model {base_model!r}; use resnet14, resnet50 or resnet101")
    return int(m.group(1))


def _pool(x: torch.Tensor, dim: int) -> torch.Tensor:
    """cat(max, mean) over ``dim``, max first, kept at ``dim`` (size 2)."""
    return torch.cat([x.amax(dim=dim, keepdim=True), x.mean(dim=dim, keepdim=True)], dim=dim)


def temporal_shift(x: torch.Tensor, num_segments: int, fold_div: int = 8) -> torch.Tensor:
    """TSM shift of ``x`` [B*T, C, H, W]: channels [0, f) from t+1, [f, 2f) from t-1, zero ends."""
    nt, c, h, w = x.shape
    x = x.view(nt // num_segments, num_segments, c, h, w)
    fold = c // fold_div
    out = torch.zeros_like(x)
    out[:, :-1, :fold] = x[:, 1:, :fold]
    out[:, 1:, fold : 2 * fold] = x[:, :-1, fold : 2 * fold]
    out[:, :, 2 * fold :] = x[:, :, 2 * fold :]
    return out.view(nt, c, h, w)


class AttentionUnit(nn.Module):
    """One of the units C, ST, CinST, STinC; input and output are [B*T, C, H, W]."""

    def __init__(self, kind: str, num_segments: int) -> None:
        super().__init__()
        if kind not in UNIT_GATES:
            raise ValueError(f"unknown attention unit {kind!r}")
        self.kind = kind
        self.num_segments = num_segments
        for g in UNIT_GATES[kind]:
            setattr(
                self, f"{g}_conv", nn.Conv3d(2, 1, kernel_size=3, stride=1, padding=1, bias=False)
            )
            setattr(self, f"{g}_bn", nn.BatchNorm3d(1))

    def gate_logits(self, gate: str, x5: torch.Tensor) -> torch.Tensor:
        """BN(conv(pool(x5))) of one gate, already laid out to broadcast onto ``x5`` [b,t,c,h,w]."""
        conv = getattr(self, f"{gate}_conv")
        bn = getattr(self, f"{gate}_bn")
        if gate == "C":  # pooled over c; Conv3d over (t, h, w)
            p = _pool(x5, 2).permute(0, 2, 1, 3, 4)  # [b, 2, t, h, w]
            return bn(conv(p)).permute(0, 2, 1, 3, 4)  # [b, t, 1, h, w]
        if gate == "T":  # pooled over t; Conv3d over (c, h, w)
            p = _pool(x5, 1)  # [b, 2, c, h, w]
            return bn(conv(p))  # [b, 1, c, h, w]
        if gate == "H":  # pooled over h; Conv3d over (t, c, w)
            p = _pool(x5, 3).permute(0, 3, 1, 2, 4)  # [b, 2, t, c, w]
            return bn(conv(p)).permute(0, 2, 3, 1, 4)  # [b, t, c, 1, w]
        if gate == "W":  # pooled over w; Conv3d over (t, h, c) -- h before c
            p = _pool(x5, 4).permute(0, 4, 1, 3, 2)  # [b, 2, t, h, c]
            return bn(conv(p)).permute(0, 2, 4, 3, 1)  # [b, t, c, h, 1]
        raise ValueError(f"unknown gate {gate!r}")

    def gate(self, gate: str, x5: torch.Tensor) -> torch.Tensor:
        """sigmoid of :meth:`gate_logits`."""
        return torch.sigmoid(self.gate_logits(gate, x5))

    def _st(self, x5: torch.Tensor) -> torch.Tensor:
        return (self.gate("T", x5) + self.gate("H", x5) + self.gate("W", x5)) / 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nt, c, h, w = x.shape
        x5 = x.view(nt // self.num_segments, self.num_segments, c, h, w)
        if self.kind == "C":
            out = x5 * self.gate("C", x5)
        elif self.kind == "ST":
            out = x5 * self._st(x5)
        elif self.kind == "CinST":
            y = x5 * self.gate("C", x5)
            out = x5 * self._st(y)  # gates from y, applied to x
        else:  # STinC
            z = x5 * self._st(x5)
            out = x5 * self.gate("C", z)  # gate from z, applied to x
        return out.reshape(nt, c, h, w)


class Bottleneck(nn.Module):
    """torchvision ResNet v1.5 bottleneck with optional TSM shift and attention after bn2."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        num_segments: int = 8,
        shift: str | None = None,
        attention: str | None = None,
        attention_before_downsample: bool = False,
    ) -> None:
        super().__init__()
        if shift not in (None, "blockres", "block"):
            raise ValueError(f"unknown shift_place {shift!r}")
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.num_segments = num_segments
        self.shift = shift
        self.combine: str | None = None
        # Only the state-dict key order depends on this: the release's C2D blocks register the
        # attention before `downsample`, its TSM blocks after (see official_keys/).
        if attention_before_downsample:
            self._add_attention(attention)
        self.downsample = downsample
        if not attention_before_downsample:
            self._add_attention(attention)

    def _add_attention(self, attention: str | None) -> None:
        if attention is None:
            return
        kinds, self.combine = PLACEMENTS[attention]
        if self.combine == "single":
            self.eft = AttentionUnit(kinds[0], self.num_segments)
        else:
            self.eft1 = AttentionUnit(kinds[0], self.num_segments)
            self.eft2 = AttentionUnit(kinds[1], self.num_segments)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        if self.combine is None:
            return x
        if self.combine == "single":
            return self.eft(x)
        if self.combine == "seq":
            return self.eft2(self.eft1(x))
        return 0.5 * self.eft1(x) + 0.5 * self.eft2(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shift == "block":  # both branches see the shifted input
            x = temporal_shift(x, self.num_segments)
        identity = x
        out = temporal_shift(x, self.num_segments) if self.shift == "blockres" else x
        out = self.relu(self.bn1(self.conv1(out)))
        out = self.bn2(self.conv2(out))
        out = self.relu(self.attend(out))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


def block_is_active(index: int, num_blocks: int) -> bool:
    """Whether block ``index`` of an ``num_blocks``-block stage carries attention and shift."""
    n_round = 2 if num_blocks >= 23 else 1
    return index % n_round == 0


class ResNet(nn.Module):
    """torchvision-layout ResNet v1.5 (bottlenecks) with optional TSM shift and AIA attention.

    Args:
      depth: 14 (1,1,1,1 blocks), 50 or 101.
      num_classes: outputs of ``fc``; ``None`` makes ``fc`` an ``nn.Dropout(dropout)`` instead.
      width: stem width; stage planes are width, 2w, 4w, 8w with expansion 4.
      num_segments: frames per clip (consecutive in the batch axis).
      shift: None, 'blockres' or 'block'.
      attention: None or a placement name of :data:`PLACEMENTS` (registered before
        ``downsample`` when ``shift`` is None, as the release's C2D does; after it for TSM).
      dropout: rate of the Dropout that replaces ``fc`` when ``num_classes`` is None.
    """

    def __init__(
        self,
        depth: int = 50,
        num_classes: int | None = 1000,
        width: int = 64,
        num_segments: int = 8,
        shift: str | None = None,
        attention: str | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if depth not in STAGES:
            raise ValueError(f"depth must be one of {sorted(STAGES)}, got {depth}")
        if attention is not None and attention not in PLACEMENTS:
            raise ValueError(f"unknown attention {attention!r}; one of {sorted(PLACEMENTS)}")
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        for s, n in enumerate(STAGES[depth]):
            stage = self._make_layer(
                width * 2**s, n, 1 if s == 0 else 2, num_segments, shift, attention
            )
            setattr(self, f"layer{s + 1}", stage)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.feature_dim = width * 8 * Bottleneck.expansion
        if num_classes is None:
            self.fc: nn.Module = nn.Dropout(p=dropout)
        else:
            self.fc = nn.Linear(self.feature_dim, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, AttentionUnit):
                _init_attention(m)

    def _make_layer(
        self,
        planes: int,
        blocks: int,
        stride: int,
        num_segments: int,
        shift: str | None,
        attention: str | None,
    ) -> nn.Sequential:
        layers = []
        for i in range(blocks):
            downsample = None
            if i == 0 and (stride != 1 or self.inplanes != planes * Bottleneck.expansion):
                downsample = nn.Sequential(
                    nn.Conv2d(
                        self.inplanes, planes * Bottleneck.expansion, 1, stride=stride, bias=False
                    ),
                    nn.BatchNorm2d(planes * Bottleneck.expansion),
                )
            active = block_is_active(i, blocks)
            layers.append(
                Bottleneck(
                    self.inplanes,
                    planes,
                    stride if i == 0 else 1,
                    downsample,
                    num_segments,
                    shift if active else None,
                    attention if active else None,
                    attention_before_downsample=shift is None,
                )
            )
            self.inplanes = planes * Bottleneck.expansion
        return nn.Sequential(*layers)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled, flattened features [N, 32*width] of images [N, 3, H, W]."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def _init_attention(unit: AttentionUnit) -> None:
    # The reference says "Kaiming (fan_out) or Xavier normal depending on unit" without saying
    # which; chosen here: Kaiming fan_out for the plain C / ST units, Xavier normal for the AIA
    # units CinST / STinC. Parity tests overwrite everything with randomize_ anyway.
    for g in UNIT_GATES[unit.kind]:
        conv = getattr(unit, f"{g}_conv")
        if unit.kind in ("C", "ST"):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        else:
            nn.init.xavier_normal_(conv.weight)


class TorchvisionResNet(ResNet):
    """torchvision ``resnet50`` / ``resnet101``: keys conv1, bn1, layerS.B.*, fc; 1000 classes.

    ``features(x)`` gives the pooled [N, 32*width] (2048 at width 64) vector per image.
    Used by the ImageNet-initialisation tests in place of torchvision, which is not installed.
    """

    def __init__(self, depth: int = 50, num_classes: int = 1000, width: int = 64) -> None:
        super().__init__(depth=depth, num_classes=num_classes, width=width)


class VideoNet(nn.Module):
    """The release's ``VideoNet``: per-frame ResNet, new_fc, average consensus over frames.

    Args:
      num_classes: classifier outputs.
      num_segments: frames per clip T.
      base_model: 'resnet50', 'resnet101' or 'resnet14' (tiny test net).
      backbone: 'TSM' (temporal shift) or 'C2D' (none).
      attention: None or a placement name (see :data:`PLACEMENTS`).
      dropout: dropout before the classifier; 0 puts the classifier at ``base_model.fc``.
      shift_place: 'blockres' (residual branch only) or 'block' (both branches).
      width: stem width of the ResNet.
    """

    def __init__(
        self,
        num_classes: int,
        num_segments: int = 8,
        base_model: str = "resnet50",
        backbone: str = "TSM",
        attention: str | None = None,
        dropout: float = 0.5,
        shift_place: str = "blockres",
        width: int = 64,
    ) -> None:
        super().__init__()
        if backbone not in ("TSM", "C2D"):
            raise ValueError(f"backbone must be 'TSM' or 'C2D', got {backbone!r}")
        if shift_place not in ("blockres", "block"):
            raise ValueError(f"shift_place must be 'blockres' or 'block', got {shift_place!r}")
        self.num_segments = num_segments
        self.num_classes = num_classes
        self.dropout = dropout
        self.base_model = ResNet(
            depth=_depth_of(base_model),
            num_classes=None if dropout > 0 else num_classes,
            width=width,
            num_segments=num_segments,
            shift=shift_place if backbone == "TSM" else None,
            attention=attention,
            dropout=dropout,
        )
        if dropout > 0:
            self.new_fc = nn.Linear(self.base_model.feature_dim, num_classes)
            nn.init.normal_(self.new_fc.weight, 0.0, 0.001)
            nn.init.zeros_(self.new_fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Clips [B, T, 3, H, W] -> logits [B, num_classes]."""
        b, t = x.shape[:2]
        if t != self.num_segments:
            raise ValueError(f"expected {self.num_segments} frames, got {t}")
        out = self.base_model(x.reshape(b * t, *x.shape[2:]))  # fc is Dropout when new_fc exists
        if self.dropout > 0:
            out = self.new_fc(out)
        return out.view(b, t, -1).mean(dim=1)


def parse_name(name: str) -> tuple[str, str | None]:
    """``'TSM_CinST_BN'`` -> ``('TSM', 'CinST')``; ``'C2D'`` -> ``('C2D', None)``."""
    parts = name.split("_")
    if parts and parts[-1] == "BN":
        parts = parts[:-1]
    if len(parts) not in (1, 2) or parts[0] not in ("TSM", "C2D"):
        raise ValueError(f"cannot parse network name {name!r}")
    attention = parts[1] if len(parts) == 2 else None
    if attention is not None and attention not in PLACEMENTS:
        raise ValueError(f"unknown attention {attention!r} in {name!r}")
    return parts[0], attention


def build(
    name: str,
    num_classes: int,
    num_segments: int = 8,
    depth: int = 50,
    dropout: float = 0.5,
    width: int = 64,
    shift_place: str = "blockres",
) -> VideoNet:
    """Builds the VideoNet of a release name such as ``TSM``, ``C2D_C_BN``, ``TSM_CinST_BN``."""
    backbone, attention = parse_name(name)
    return VideoNet(
        num_classes,
        num_segments=num_segments,
        base_model=f"resnet{depth}",
        backbone=backbone,
        attention=attention,
        dropout=dropout,
        shift_place=shift_place,
        width=width,
    )


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Overwrites every parameter and buffer of ``model`` with random values, in place.

    Scales keep activations of a deep net in a sane range (He-like conv weights, BN scales in
    [0.5, 1.5], positive running variances) so that parity tests compare non-trivial numbers.
    """
    gen = torch.Generator().manual_seed(seed)

    def normal(shape: Sequence[int], std: float) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=gen) * std

    def uniform(shape: Sequence[int], lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(tuple(shape), generator=gen)

    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                v = uniform(p.shape, 0.5, 1.5) if pname == "weight" else normal(p.shape, 0.2)
            elif pname == "weight" and p.dim() > 1:
                fan_in = p[0].numel()
                v = normal(p.shape, math.sqrt(2.0 / fan_in))
            else:
                v = normal(p.shape, 0.1)
            p.copy_(v.to(p.dtype))
        for bname, b in module.named_buffers(recurse=False):
            if bname == "running_var":
                v = uniform(b.shape, 0.5, 2.0)
            elif bname == "running_mean":
                v = normal(b.shape, 0.2)
            elif bname == "num_batches_tracked":
                v = torch.randint(1, 10_000, tuple(b.shape), generator=gen)
            elif b.dtype.is_floating_point:
                v = normal(b.shape, 0.1)
            else:
                v = torch.randint(0, 100, tuple(b.shape), generator=gen)
            b.copy_(v.to(b.dtype))
    return model


def count_params(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameter elements."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
