"""Tiled super-resolution: run a model tile by tile and blend the tiles back without seams.

Tiles overlap by at least ``overlap`` input pixels. Near a tile's inner edge the model sees zero
padding instead of the neighbouring pixels, so its output there is wrong; each tile's blending
weight is therefore zero over the outer quarter of every overlap (the margin), ramps linearly
across the middle half and is one beyond. Two neighbours' weights sum to one everywhere, and a
pixel only takes output from tiles where it lies at least ``overlap // 4`` pixels inside. For a
model whose receptive field is within that margin the tiled result equals whole-image inference;
for deeper models the error left is what the model lets through from that far away, which the
ramp spreads out instead of leaving as a step. Image borders get no ramp: there a tile pads
exactly as the whole image would.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from pipelines.job_control import JobInterrupted

#: A model as the tiler needs it: (1, C, h, w) in 0..1 -> (1, C, h * scale, w * scale).
TileModel = Callable[[torch.Tensor], torch.Tensor]
StopCheck = Callable[[], object]


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` pixels covering ``length``, evenly spread, overlapping by >= ``overlap``.

    ``tile`` 0 (or a tile as large as the image) means a single tile.
    """
    if tile <= 0 or length <= tile:
        return [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    last = length - tile
    return [round(index * last / (count - 1)) for index in range(count)]


def count_tiles(width: int, height: int, tile: int, overlap: int) -> int:
    """How many model calls :func:`tiled_upscale` makes for an image of this size."""
    return len(tile_starts(width, tile, overlap)) * len(tile_starts(height, tile, overlap))


def _axis_weights(starts: list[int], span: int, scale: int) -> list[torch.Tensor]:
    """Blending weights, in output pixels, of each tile along one axis; they sum to one at every pixel."""
    centres = (torch.arange(span * scale, dtype=torch.float64) + 0.5) / scale  # in input pixels from the tile start
    weights = []
    for index, start in enumerate(starts):
        weight = torch.ones(span * scale, dtype=torch.float64)
        if index > 0:  # ramp up across the overlap with the previous tile
            shared = starts[index - 1] + span - start
            weight *= _ramp(centres, shared)
        if index + 1 < len(starts):  # ramp down across the overlap with the next tile
            shared = start + span - starts[index + 1]
            weight *= _ramp(span - centres, shared)
        weights.append(weight)
    length = (starts[-1] + span) * scale
    total = torch.zeros(length, dtype=torch.float64)
    for start, weight in zip(starts, weights, strict=True):
        total[start * scale : start * scale + weight.numel()] += weight
    # Pairs of neighbours already sum to one; dividing also covers a pixel shared by three tiles.
    return [
        (weight / total[start * scale : start * scale + weight.numel()]).float()
        for start, weight in zip(starts, weights, strict=True)
    ]


def _ramp(distance: torch.Tensor, shared: int) -> torch.Tensor:
    """0 within the margin of an edge, then linear up to 1 at the far end of the shared strip."""
    margin = shared // 4
    width = shared - 2 * margin
    if width <= 0:
        return (distance >= margin).to(distance.dtype)
    return ((distance - margin) / width).clamp(0.0, 1.0)


def tiled_upscale(
    model: TileModel,
    image: torch.Tensor,
    scale: int,
    *,
    tile: int = 192,
    overlap: int = 32,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    on_tile: Callable[[], None] | None = None,
    should_stop: StopCheck | None = None,
) -> torch.Tensor:
    """Upscale ``image`` (1, C, H, W, float in 0..1, any device) by ``scale`` with ``model``, tile by tile.

    Each tile goes to ``device`` as ``dtype``; the blended result is accumulated in float32 on the
    CPU, so the device only ever holds one tile. ``tile`` 0 runs the model on the whole image.
    ``on_tile`` is called after each tile; ``should_stop`` before each one: a truthy answer raises
    :class:`~pipelines.job_control.JobInterrupted`, and an exception it raises itself (``JobControl.check``)
    propagates. Returns (1, C, H * scale, W * scale) float32 on the CPU.
    """
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"image must be a (1, C, H, W) tensor, got shape {tuple(image.shape)}")
    check_tiling(tile, overlap)
    _, channels, height, width = image.shape
    tile_h, tile_w = (min(tile, height), min(tile, width)) if tile > 0 else (height, width)
    ys, xs = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    weights_y, weights_x = _axis_weights(ys, tile_h, scale), _axis_weights(xs, tile_w, scale)
    output = torch.zeros(channels, height * scale, width * scale, dtype=torch.float32)
    for y, weight_y in zip(ys, weights_y, strict=True):
        for x, weight_x in zip(xs, weights_x, strict=True):
            if should_stop is not None and should_stop():
                raise JobInterrupted()
            patch = image[:, :, y : y + tile_h, x : x + tile_w].to(device=device, dtype=dtype)
            result = model(patch)[0].to(device="cpu", dtype=torch.float32)
            expected = (channels, tile_h * scale, tile_w * scale)
            if tuple(result.shape) != expected:
                raise ValueError(f"the model returned {tuple(result.shape)} for a tile that should give {expected}")
            region = output[:, y * scale : (y + tile_h) * scale, x * scale : (x + tile_w) * scale]
            region += result * weight_y[:, None] * weight_x[None, :]
            if on_tile is not None:
                on_tile()
    return output[None]


def check_tiling(tile: int, overlap: int) -> None:
    """ValueError naming the field unless ``tile`` is 0 (no tiling) or >= 16 and 0 <= ``overlap`` <= tile / 2."""
    if tile != 0 and tile < 16:
        raise ValueError(f"tile: must be 0 (whole image) or at least 16 pixels, got {tile}")
    if overlap < 0 or (tile > 0 and overlap * 2 > tile):
        raise ValueError(f"overlap: must be between 0 and half the tile size ({tile // 2}), got {overlap}")
