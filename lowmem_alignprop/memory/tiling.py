"""Tiled VAE decode with gradients: overlapping latent tiles, each decoded under its own checkpoint,
blended with linear ramps across the seams.

Why not diffusers' ``AutoencoderKL.tiled_decode`` (``vae.enable_tiling()``)? It is differentiable (its
in-place seam blends are autograd-safe, and ``tests/test_tiling.py`` checks it), but for training it
saves nothing where our peak is: every tile's decoder activations stay alive until ``backward``, so
the backward peak is that of one whole-image decode plus the overlaps (measured in the tests). Its seams
are also blended one pixel row at a time in Python, and its last row/column of tiles is cut short.
Here each tile is one non-reentrant gradient checkpoint: only the latent tile is kept, and backward
recomputes and frees one tile's decoder at a time, so the decoder's backward peak is one tile's. The
decoding itself is still diffusers' ``vae.decode`` on each tile.

Tiles differ from a whole-image decode everywhere a little (GroupNorm statistics and the mid-block's
attention see one tile instead of the image) and most at the seams; the tests state the tolerance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowmem_alignprop.memory.recompute import checkpoint
from lowmem_alignprop.settings.config import tile_overlap_fits
from lowmem_alignprop.settings.image_size import height_width


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of side ``tile`` covering ``size`` with at least ``overlap`` shared cells.

    The last tile is moved back to end exactly at ``size`` (its overlap with the previous one is then
    larger), so every tile has the full side and no tile is cut short.
    """
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] + tile < size:
        starts.append(size - tile)
    return starts


def ramp_weights(length: int, ramp: int, ramp_start: bool, ramp_end: bool, device, dtype) -> torch.Tensor:
    """1-D blend weights of one tile side: linear ramps over ``ramp`` pixels at the sides that meet another
    tile, 1 elsewhere. Values stay above 0 so every output pixel has a positive total weight."""
    w = torch.ones(length, device=device, dtype=dtype)
    r = min(ramp, length)
    if r > 0:
        up = (torch.arange(r, device=device, dtype=dtype) + 0.5) / r
        if ramp_start:
            w[:r] = torch.minimum(w[:r], up)
        if ramp_end:
            w[length - r:] = torch.minimum(w[length - r:], up.flip(0))
    return w


def cuts_tiles(height: int, width: int, tile: int) -> bool:
    """Whether a latent of ``height`` x ``width`` cells is decoded in tiles of ``tile`` cells; one no larger than a
    tile is decoded whole (one image at a time, as every tiled decode is)."""
    return height > tile or width > tile


def latent_cells(size: int | tuple[int, int], vae_scale: int) -> tuple[int, int]:
    """(height, width) in latent cells (``vae_scale`` px a cell) of images of ``size``: a side, or (height, width)
    in pixels."""
    height, width = height_width(size)
    return height // vae_scale, width // vae_scale


def cuts_images(size: int | tuple[int, int], tile_size: int, vae_scale: int) -> bool:
    """Whether tiled decode cuts images of ``size`` (a side, or (height, width) in pixels) into tiles: their latents
    (``vae_scale`` px a cell) are larger than ``tile_size`` cells on a side."""
    return cuts_tiles(*latent_cells(size, vae_scale), tile_size)


def untiled_note(tiled_decode: bool, size: int | tuple[int, int] | list[tuple[int, int]], tile_size: int,
                 vae_scale: int, tile_overlap: int) -> str | None:
    """What to say of a tiled_decode that cuts no tile (the latents no larger than ``tile_size``), else None. The
    tile size it names cuts the latents in two; with a ``tile_overlap`` that size refuses (under half a tile) it
    names an overlap of a quarter tile too, so the fix it gives is one the run takes. ``size``: a list of sizes (a
    run of several): said where none is cut, of the one with the longest latent side."""
    sizes = size if isinstance(size, list) else [size]
    if not tiled_decode or any(cuts_images(one, tile_size, vae_scale) for one in sizes):
        return None
    height, width = max((latent_cells(one, vae_scale) for one in sizes), key=max)
    smaller = max(max(height, width) // 2, 1)
    fix = f"--set tile_size={smaller}"
    if not tile_overlap_fits(smaller, tile_overlap):
        fix += f" --set tile_overlap={smaller // 4}"
    cells = f"{height} cells a side" if height == width else f"{width}x{height} cells (width x height)"
    return (f"tiled_decode cuts no tile: the latents are {cells} and tile_size={tile_size} counts latent "
            f"cells ({tile_size * vae_scale} px), so each image decodes whole, as sliced_decode does; "
            f"{fix} cuts it in tiles")


def _decode_tile(vae, z_tile: torch.Tensor) -> torch.Tensor:
    return vae.decode(z_tile).sample


def tiled_decode(vae, z: torch.Tensor, *, tile_size: int = 64, overlap: int = 16,
                 checkpoint_tiles: bool = True) -> torch.Tensor:
    """Decode latents ``z`` (already divided by the VAE's scaling factor) tile by tile, with gradients.

    ``tile_size`` and ``overlap`` are in latent cells (x8 pixels for Stable Diffusion's VAE). Returns the
    decoder's output (range about [-1, 1]) with the same shape as ``vae.decode(z).sample``. Images are
    decoded one at a time, and a latent no larger than one tile is decoded whole (no seams). With
    ``checkpoint_tiles`` (default) and gradients on, each tile's decoder activations are recomputed in
    backward instead of kept.
    """
    if not tile_overlap_fits(tile_size, overlap):
        raise ValueError(f"overlap={overlap} must be under half of tile_size={tile_size}")
    if z.shape[0] > 1:  # one image at a time: a tile's activations exist for one image, not the batch
        return torch.cat([tiled_decode(vae, z[i:i + 1], tile_size=tile_size, overlap=overlap,
                                       checkpoint_tiles=checkpoint_tiles) for i in range(z.shape[0])])
    _, _, h, w = z.shape
    if not cuts_tiles(h, w, tile_size):
        return vae.decode(z).sample
    rows, cols = tile_starts(h, tile_size, overlap), tile_starts(w, tile_size, overlap)
    th, tw = min(h, tile_size), min(w, tile_size)
    out = total = None
    scale = None
    for i, r0 in enumerate(rows):
        for j, c0 in enumerate(cols):
            z_tile = z[:, :, r0:r0 + th, c0:c0 + tw]
            if checkpoint_tiles and torch.is_grad_enabled():
                # one checkpoint per tile: keep only the latent tile, recompute its decoder in backward
                x = checkpoint(_decode_tile, vae, z_tile)
            else:
                x = _decode_tile(vae, z_tile)
            if scale is None:
                scale = x.shape[-1] // tw  # pixels per latent cell (8 for SD's VAE)
                out_h, out_w = h * scale, w * scale
            ramp = overlap * scale
            wy = ramp_weights(th * scale, ramp, i > 0, i < len(rows) - 1, x.device, torch.float32)
            wx = ramp_weights(tw * scale, ramp, j > 0, j < len(cols) - 1, x.device, torch.float32)
            weight = (wy[:, None] * wx[None, :]).to(x.dtype)
            pad = (c0 * scale, out_w - (c0 + tw) * scale, r0 * scale, out_h - (r0 + th) * scale)
            # out-of-place accumulation: the tile output is not saved for backward (only the constant weight)
            piece = F.pad(x * weight, pad)
            out = piece if out is None else out + piece
            tw_full = F.pad(weight, pad)
            total = tw_full if total is None else total + tw_full
    return out / total
