"""A convolution as linear maps of its input, for the analytic attack's solves.

The operators come from torch.nn.grad (conv2d_input is the adjoint of the convolution
in its input, conv2d_weight the weight gradient as a linear map of the input), so they
work on any device, stride, padding, dilation and groups. attacker/analytic_solvers.py
builds its normal equations and CG from them (and re-exports these names).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_input, conv2d_weight


def numeric_padding(conv: nn.Conv2d, name: str = "") -> tuple[int, int]:
    """The convolution's (top/bottom, left/right) zero padding, "valid"/"same" resolved.

    Raises:
        ValueError: for "same" padding that would be asymmetric (even kernel extent).
    """
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        extents = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        if any(e % 2 for e in extents):
            raise ValueError(f"analytic attack needs symmetric padding; '{name}' pads 'same' "
                             "with an even kernel extent")
        return (extents[0] // 2, extents[1] // 2)
    return (int(conv.padding[0]), int(conv.padding[1]))


@dataclass(frozen=True)
class ConvOps:
    """The linear maps of one convolution in its input x, in float64.

    forward(x) = conv(x) without bias; gradient(x) = d<conv(x), delta>/dW, the weight
    gradient the sample x produces given the output's delta. Both are linear in x,
    and `*_adjoint` are their transposes.
    """

    weight: torch.Tensor  # (O, C/groups, kh, kw)
    in_shape: tuple[int, ...]  # (1, C, H, W)
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int

    @classmethod
    def of(cls, conv: nn.Conv2d, in_shape: tuple[int, ...], dtype: torch.dtype) -> ConvOps:
        stride, dilation = conv.stride, conv.dilation
        return cls(conv.weight.detach().to(dtype), tuple(in_shape), (stride[0], stride[1]),
                   numeric_padding(conv), (dilation[0], dilation[1]), conv.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, None, self.stride, self.padding, self.dilation, self.groups)

    def forward_adjoint(self, y: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        w = self.weight if weight is None else weight
        return conv2d_input(self.in_shape, w, y, self.stride, self.padding, self.dilation,
                            self.groups)

    def gradient(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return conv2d_weight(x, self.weight.shape, delta, self.stride, self.padding,
                             self.dilation, self.groups)

    def gradient_adjoint(self, g: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return conv2d_input(self.in_shape, g, delta, self.stride, self.padding, self.dilation,
                            self.groups)

    def normal_operator(
        self, w_f: float, s2: torch.Tensor, w_g: float, delta: torch.Tensor
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """x -> w_f A_f^T (s2 * A_f x) + w_g A_g^T A_g x, the normal equations' matrix.

        With groups == 1 it works on x's patches (unfold): with U = unfold(x)
        (C*kh*kw, L), A_f x = W U and A_g x = delta U^T, so the whole product is
        fold(W^T (s2 * W U) + (delta U^T)^T delta) with W, delta flattened to
        (O, C*kh*kw) and (O, L): one unfold, one fold and four small matmuls,
        about half the time of the four convolution calls.
        """
        if self.groups != 1:
            def by_convolutions(x: torch.Tensor) -> torch.Tensor:
                out = self.gradient_adjoint(self.gradient(x, delta), delta)
                return w_g * out + w_f * self.forward_adjoint(s2 * self.forward(x))
            return by_convolutions
        out_channels = self.weight.shape[0]
        kernel = (self.weight.shape[2], self.weight.shape[3])
        geometry = {"kernel_size": kernel, "dilation": self.dilation, "padding": self.padding,
                    "stride": self.stride}
        w_flat = self.weight.reshape(out_channels, -1)  # (O, C*kh*kw)
        w_flat_t = w_flat.T.contiguous()
        d_flat = delta.reshape(out_channels, -1)  # (O, L)
        d_scaled = w_g * d_flat
        s2_scaled = (w_f * s2).reshape(out_channels, -1)  # (O, L)
        size = self.in_shape[2:]

        def by_patches(x: torch.Tensor) -> torch.Tensor:
            patches = F.unfold(x, **geometry)[0]  # (C*kh*kw, L)
            grad = d_flat @ patches.T  # (O, C*kh*kw), the weight gradient of x
            cols = torch.addmm(grad.T @ d_scaled, w_flat_t, s2_scaled * (w_flat @ patches))
            return F.fold(cols.unsqueeze(0), size, **geometry)

        return by_patches
