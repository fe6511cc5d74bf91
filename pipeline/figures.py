"""Pictures for people: image grids (PNG) written from tensors."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def image_grid(rows: list[torch.Tensor], pad: int = 2) -> Image.Image:
    """One grid row per tensor of uint8 images (N, 3, H, W); shorter rows are left blank."""
    columns = max(len(row) for row in rows)
    _, _, height, width = rows[0].shape
    canvas = np.full((len(rows) * (height + pad) + pad, columns * (width + pad) + pad, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            top, left = pad + r * (height + pad), pad + c * (width + pad)
            canvas[top : top + height, left : left + width] = image.permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(canvas)


def png_bytes(image: Image.Image, min_side: int = 256) -> bytes:
    """PNG of an image, enlarged (nearest neighbour) so that small grids stay readable."""
    scale = max(1, min_side // min(image.size))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()
