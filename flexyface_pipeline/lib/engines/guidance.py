"""Per-image classifier-free guidance, shared by the engines whose pipelines apply it.

diffusers combines a batch's two noise predictions as ``uncond + guidance_scale * (text - uncond)``
with one Python float. For a float, PyTorch multiplies in float32 (the op-math type of
float16/bfloat16 too) and rounds the product to the prediction's dtype. ``GuidanceScales`` stands in
for that float with a (B,) float32 tensor, one scale per image, broadcast over the prediction's
other dimensions and rounded the same way: each image's guided prediction is bit-for-bit the one
a single-image call computes. diffusers runs a scale <= 1 without classifier-free guidance
(``uses_cfg``), so such images never share a batch with guided ones.
"""

from __future__ import annotations

import torch


def uses_cfg(guidance: float | None) -> bool:
    """Whether diffusers' CFG pipelines (SDXL, SD3, HiDream) apply classifier-free guidance at this scale."""
    return guidance is not None and guidance > 1.0


class GuidanceScales:
    """One guidance scale per image in place of the pipeline's float ``guidance_scale``."""

    def __init__(self, scales: torch.Tensor) -> None:
        self.scales = scales

    def __mul__(self, other: torch.Tensor) -> torch.Tensor:
        scales = self.scales.to(other.device).view(-1, *([1] * (other.dim() - 1)))
        return (scales * other.float()).to(other.dtype)

    __rmul__ = __mul__
