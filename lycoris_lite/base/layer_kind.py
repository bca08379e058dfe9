"""What an adapter needs to know about the layer it wraps, as data.

Linear and Conv2d differ only by the operation and its keyword arguments, so every algorithm is
written once against :class:`LayerSpec` and never branches on the module class.

Shapes: a Linear weight is ``(out, in)``; a Conv2d weight is ``(out, in, kh, kw)``. The *flat* weight
used by input-side rotations is ``(out, in * kh * kw)`` (PEFT's layout: index ``c * kh * kw + tap``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_TYPES = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class LayerSpec:
    """Geometry of a Linear or Conv2d layer.

    ``kind`` is ``"linear"`` or ``"conv2d"``; ``channel_dim`` is where output (and input) channels
    live in an activation: -1 for linear layers, 1 for convolutions.
    """

    kind: str
    out_features: int
    in_features: int
    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | str = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    padding_mode: str = "zeros"

    @classmethod
    def from_module(cls, module: nn.Module, name: str = "") -> "LayerSpec":
        """Describe ``module``; raises ``TypeError`` for unsupported layers (grouped convs included)."""
        if isinstance(module, nn.Linear):
            return cls("linear", module.out_features, module.in_features)
        if isinstance(module, nn.Conv2d):
            if module.groups != 1:
                raise TypeError(
                    f"layer {name!r} is a grouped Conv2d (groups={module.groups}); adapters support "
                    "only groups=1 convolutions. Exclude it with exclude_modules."
                )
            return cls(
                "conv2d",
                module.out_channels,
                module.in_channels,
                tuple(module.kernel_size),
                tuple(module.stride),
                module.padding if isinstance(module.padding, str) else tuple(module.padding),
                tuple(module.dilation),
                module.padding_mode,
            )
        raise TypeError(
            f"layer {name!r} is a {type(module).__name__}; adapters support nn.Linear and nn.Conv2d"
        )

    @property
    def is_conv(self) -> bool:
        return self.kind == "conv2d"

    @property
    def channel_dim(self) -> int:
        return 1 if self.is_conv else -1

    @property
    def taps(self) -> int:
        return self.kernel_size[0] * self.kernel_size[1]

    @property
    def flat_in(self) -> int:
        """Length of a flattened weight row: ``in * kh * kw``."""
        return self.in_features * self.taps

    @property
    def is_pointwise(self) -> bool:
        """True for Linear and 1x1 convs: input-channel mixing commutes with the layer's op."""
        return self.taps == 1

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.is_conv:
            return (self.out_features, self.in_features, *self.kernel_size)
        return (self.out_features, self.in_features)

    # ---- the layer's operation, with its keyword arguments -------------------------------------
    def op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``y = op(x, weight) + bias`` with this layer's stride, padding and dilation."""
        if not self.is_conv:
            return F.linear(x, weight, bias)
        if self.padding_mode != "zeros":
            pad = _reversed_padding(self.padding, self.kernel_size, self.dilation)
            x = F.pad(x, pad, mode=self.padding_mode)
            return F.conv2d(x, weight, bias, self.stride, 0, self.dilation)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation)

    def pointwise(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Channel mix with a ``(out, in)`` matrix: a matmul for linear, a 1x1 conv for conv."""
        if not self.is_conv:
            return F.linear(x, weight)
        return F.conv2d(x, weight[:, :, None, None])

    def add_bias(self, y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if bias is None:
            return y
        return y + (bias[:, None, None] if self.is_conv else bias)

    def flatten_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``(out, in[, kh, kw]) -> (out, in*kh*kw)``."""
        return weight.reshape(weight.shape[0], -1)

    def unflatten_weight(self, flat: torch.Tensor) -> torch.Tensor:
        return flat.reshape(self.weight_shape)


def _reversed_padding(padding, kernel_size, dilation):
    if isinstance(padding, str):  # "same" with a non-zero padding mode
        total = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
        pad = []
        for t in reversed(total):
            pad += [t // 2, t - t // 2]
        return tuple(pad)
    return (padding[1], padding[1], padding[0], padding[0])


def move_channels_last(t: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    return t.movedim(1, -1) if spec.is_conv else t


def move_channels_back(t: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    return t.movedim(-1, 1) if spec.is_conv else t
