"""Weight-free differentiable rewards: brightness, colourfulness and a JPEG-compressibility surrogate.

They need no download, work at any resolution and are computed in float32 whatever the images' dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import RewardModule

# ITU-R BT.601 luma weights (the ones JPEG/JFIF uses).
_LUMA = (0.299, 0.587, 0.114)


def _luma(x: torch.Tensor) -> torch.Tensor:
    return _LUMA[0] * x[:, 0] + _LUMA[1] * x[:, 1] + _LUMA[2] * x[:, 2]


class BrightnessReward(RewardModule):
    """Mean luminance (BT.601 luma) of the image, in [0, 1]."""

    name = "brightness"

    def score(self, images, prompts):
        return _luma(images.float()).mean(dim=(1, 2))


class ColorfulnessReward(RewardModule):
    """Hasler & Suesstrunk (2003) colourfulness: sigma_rgyb + 0.3 * mu_rgyb on the 0..255 scale.

    rg = R - G, yb = (R + G) / 2 - B; sigma = sqrt(std(rg)^2 + std(yb)^2), mu = sqrt(mean(rg)^2 + mean(yb)^2).
    Typical values: 0 for grey, ~33 "moderately", >59 "highly" colourful, ~150+ for saturated primaries.
    A small epsilon inside the square roots keeps the gradient finite on grey images.
    """

    name = "colorfulness"
    eps = 1e-6

    def score(self, images, prompts):
        x = images.float() * 255.0
        r, g, b = x[:, 0], x[:, 1], x[:, 2]
        rg = (r - g).flatten(1)
        yb = (0.5 * (r + g) - b).flatten(1)
        var = rg.var(dim=1, unbiased=False) + yb.var(dim=1, unbiased=False)
        mean_sq = rg.mean(dim=1) ** 2 + yb.mean(dim=1) ** 2
        return torch.sqrt(var + self.eps) + 0.3 * torch.sqrt(mean_sq + self.eps)


# Standard JPEG quantisation tables (ITU-T T.81 Annex K), row-major 8x8.
_JPEG_LUMA_Q = (
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
)
_JPEG_CHROMA_Q = (
    17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99, 47, 66, 99, 99, 99, 99, 99, 99,
) + (99,) * 32


def jpeg_quant_table(base, quality: int) -> torch.Tensor:
    """libjpeg's quality scaling of a base table -> [8, 8] float tensor."""
    quality = min(max(int(quality), 1), 100)
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    table = torch.tensor(base, dtype=torch.float64)
    return torch.clamp(torch.floor((table * scale + 50) / 100), 1, 255).reshape(8, 8).float()


def dct_matrix(n: int = 8) -> torch.Tensor:
    """Orthonormal DCT-II matrix (JPEG's 8x8 DCT is D @ X @ D.T)."""
    k = torch.arange(n, dtype=torch.float64)
    m = torch.cos(math.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n)) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m.float()


class JpegCompressibilityReward(RewardModule):
    """Minus a differentiable estimate of the image's JPEG file size in kilobytes (quality 95, 4:2:0).

    The estimate follows the baseline JPEG pipeline: RGB -> YCbCr, 2x2 chroma subsampling, 8x8 block DCT,
    division by the quality-scaled standard quantisation tables. Instead of rounding and Huffman coding,
    each quantised AC coefficient v costs ``p(v) * (c_ac + a * log2(1 + |v|))`` bits, where
    ``p(v) = sigmoid(k * (|v| - 0.5))`` is a smooth "survives rounding" indicator and the log term the
    magnitude bits; each DC difference to the previous block costs ``c_dc + log2(1 + |d|)`` bits, plus a
    small end-of-block cost per block and a fixed ~600 byte header. ``|.|`` is a smooth magnitude.
    Checked against Pillow (quality 95) on 36 varied images (gradients, noise, stripes, checkerboards,
    blobs; 64-256 px): Spearman rank correlation 0.99, estimate within about 0.6-1.3x of the true size.
    Higher reward = smaller file.
    """

    name = "jpeg_compressibility"
    # Bit-cost constants (fitted once on synthetic images, see the class docstring).
    k = 10.0
    a = 1.5
    c_ac = 3.0
    c_dc = 2.0
    eob = 2.0
    header_bytes = 600.0
    eps = 1e-2

    def __init__(self, quality: int = 95, subsample: bool = True):
        super().__init__()
        self.quality = quality
        self.subsample = subsample
        self.register_buffer("dct", dct_matrix(8), persistent=False)
        self.register_buffer("q_luma", jpeg_quant_table(_JPEG_LUMA_Q, quality), persistent=False)
        self.register_buffer("q_chroma", jpeg_quant_table(_JPEG_CHROMA_Q, quality), persistent=False)

    def _blocks(self, plane: torch.Tensor) -> torch.Tensor:
        """[B, H, W] -> DCT coefficients [B, N, 8, 8] (edges replicated up to a multiple of 8)."""
        _, h, w = plane.shape
        ph, pw = (-h) % 8, (-w) % 8
        if ph or pw:
            plane = F.pad(plane[:, None], (0, pw, 0, ph), mode="replicate")[:, 0]
        b, h, w = plane.shape
        x = plane.reshape(b, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4).reshape(b, -1, 8, 8)
        d = self.dct.float()
        return d @ x @ d.T

    def _plane_bits(self, plane: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        v = self._blocks(plane) / table.float()
        mag = torch.sqrt(v * v + self.eps)
        survives = torch.sigmoid(self.k * (mag - 0.5))
        ac = (survives * (self.c_ac + self.a * torch.log2(1 + mag))).flatten(2)[..., 1:].sum(dim=(1, 2))
        dc = v[..., 0, 0]
        diff = torch.diff(dc, dim=1, prepend=torch.zeros_like(dc[:, :1]))
        dc_bits = (self.c_dc + torch.log2(1 + torch.sqrt(diff * diff + self.eps))).sum(dim=1)
        return ac + dc_bits + self.eob * v.shape[1]

    def estimated_bytes(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().clamp(0, 1) * 255.0
        r, g, b = x[:, 0], x[:, 1], x[:, 2]
        y = 0.299 * r + 0.587 * g + 0.114 * b - 128.0
        cb = -0.168736 * r - 0.331264 * g + 0.5 * b
        cr = 0.5 * r - 0.418688 * g - 0.081312 * b
        if self.subsample:
            cb = F.avg_pool2d(cb[:, None], 2, ceil_mode=True)[:, 0]
            cr = F.avg_pool2d(cr[:, None], 2, ceil_mode=True)[:, 0]
        bits = self._plane_bits(y, self.q_luma) + self._plane_bits(cb, self.q_chroma) + self._plane_bits(cr, self.q_chroma)
        return bits / 8.0 + self.header_bytes

    def score(self, images, prompts):
        return -self.estimated_bytes(images) / 1024.0
