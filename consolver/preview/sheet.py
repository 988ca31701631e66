"""Contact sheets with PIL: labelled grids of previews (and finals), readable at a glance.

A sheet is a title and one block per prompt. A block is the prompt, then bands of at most
``columns`` columns (one column per seed, labelled above its tiles), each band one row per
solver (labelled on the left). Small images (the toy's 32x32) are upscaled by an integer factor
with nearest-neighbour sampling, so pixels stay crisp; large ones are shrunk to thumbnails.
:func:`draw_sheet` returns the image and its :class:`SheetLayout` (every tile's box and label),
which tests and UIs use to find a seed's tile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image, ImageDraw, ImageFont

from consolver.data.format import to_uint8_hwc

MARGIN, GAP, PAD = 16, 6, 4
BACKGROUND, INK, MUTED, FRAME = (255, 255, 255), (20, 20, 20), (90, 90, 90), (200, 200, 200)
Box = Tuple[int, int, int, int]


@dataclass
class SheetBlock:
    """One prompt's grid: ``rows`` maps a row name (e.g. ``"ConsistencySolver K=4"``) to images
    ``[C, 3, H, W]`` in [0, 1], one per column; ``columns`` labels the C columns (e.g. ``"seed 3"``);
    ``captions`` (optional) maps a row name to C short texts drawn under its tiles."""

    title: str
    columns: List[str]
    rows: Dict[str, torch.Tensor]
    captions: Dict[str, List[str]] = field(default_factory=dict)


@dataclass
class Tile:
    """Where one image sits: ``box`` ``(x0, y0, x1, y1)`` in sheet pixels (x1, y1 exclusive);
    ``label`` the column label drawn above it (``label_box``); ``block`` its block's index."""

    block: int
    row: str
    column: int
    label: str
    box: Box
    label_box: Box
    caption: Optional[str] = None


@dataclass
class SheetLayout:
    size: Tuple[int, int]
    tile_size: int
    tiles: List[Tile]

    def row(self, name: str, block: int = 0) -> List[Tile]:
        """The tiles of row ``name`` in ``block``, in column order."""
        return sorted((t for t in self.tiles if t.row == name and t.block == block), key=lambda t: t.column)


def shorten(text: str, width: int = 40, ellipsis: str = "\u2026") -> str:
    """``text`` on one line in at most ``width`` characters, cut at a word boundary and ended with
    ``ellipsis`` when it is longer (a single word longer than ``width`` is cut inside it)."""
    text = " ".join(str(text).split())
    if len(text) <= width:
        return text
    room = max(1, width - len(ellipsis))
    head = text[:room]
    if text[room] != " " and " " in head:  # the cut falls inside a word: drop that word
        head = head.rsplit(" ", 1)[0]
    return head.rstrip(" ,;:") + ellipsis


def font(size: int):
    """Pillow's default font at ``size`` px (the fixed bitmap font on Pillow < 10.1 or without FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def default_tile_size(side: int) -> int:
    """Tile side in pixels for images of side ``side``: small ones upscaled by an integer factor
    to at least 128 px, large ones shrunk to 256 px."""
    if side < 128:
        return side * math.ceil(128 / side)
    return min(side, 256)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> List[str]:
    lines: List[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}".strip()
            if line and draw.textlength(candidate, font=font) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def _line_height(font) -> int:
    box = font.getbbox("Ag")
    return box[3] + 2


def _thumbnail(image: torch.Tensor, size: int) -> Image.Image:
    pil = Image.fromarray(to_uint8_hwc(image[None])[0])
    if pil.size == (size, size):
        return pil
    resample = Image.NEAREST if size >= pil.width else Image.LANCZOS
    return pil.resize((size, size), resample)


def draw_sheet(blocks: Sequence[SheetBlock], title: str = "", columns: int = 8,
               tile_size: Optional[int] = None) -> Tuple[Image.Image, SheetLayout]:
    """Draw ``blocks`` under ``title``; at most ``columns`` tiles per row (more wrap into bands).

    Returns ``(RGB image, layout)``; the layout lists every tile (see :class:`Tile`).
    """
    if not blocks or any(not b.rows or not b.columns for b in blocks):
        raise ValueError("a contact sheet needs at least one block with one row and one column")
    for b in blocks:
        for name, images in b.rows.items():
            if images.ndim != 4 or len(images) != len(b.columns):
                raise ValueError(f"row {name!r} of block {b.title!r}: {tuple(images.shape)} images for "
                                 f"{len(b.columns)} columns (need [C, 3, H, W])")
    side = int(next(iter(blocks[0].rows.values())).shape[-1])
    T = int(tile_size or default_tile_size(side))
    columns = max(1, int(columns))
    title_font, head_font, body, small = font(20), font(16), font(14), font(12)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(probe.multiline_textbbox((0, 0), name, font=body)[2] for b in blocks for name in b.rows) + 2 * PAD
    ncols = min(columns, max(len(b.columns) for b in blocks))
    grid_w = ncols * (T + GAP) - GAP
    width = max(MARGIN + label_w + GAP + grid_w + MARGIN, 440)
    text_w = width - 2 * MARGIN
    lh, sh, hh, th = _line_height(body), _line_height(small), _line_height(head_font), _line_height(title_font)

    # ---- pass 1: layout
    ops: List[tuple] = []  # ("text", xy, text, font, fill) | ("tile", box, image) | ("frame", box)
    tiles: List[Tile] = []
    y = MARGIN
    for line in _wrap(probe, title, title_font, text_w) if title else []:
        ops.append(("text", (MARGIN, y), line, title_font, INK))
        y += th
    y += GAP if title else 0
    for bi, block in enumerate(blocks):
        y += GAP
        for line in _wrap(probe, block.title, head_font, text_w) if block.title else []:
            ops.append(("text", (MARGIN, y), line, head_font, INK))
            y += hh
        for band_start in range(0, len(block.columns), ncols):
            band = range(band_start, min(band_start + ncols, len(block.columns)))
            label_y = y + PAD
            y = label_y + lh
            for ri, (name, images) in enumerate(block.rows.items()):
                x0 = MARGIN + label_w + GAP
                name_h = probe.multiline_textbbox((0, 0), name, font=body)[3]
                ops.append(("mtext", (MARGIN, y + (T - name_h) // 2), name, body, INK))
                captions = block.captions.get(name)
                for k, c in enumerate(band):
                    x = x0 + k * (T + GAP)
                    box = (x, y, x + T, y + T)
                    label = block.columns[c]
                    lw = int(probe.textlength(label, font=body))
                    label_box = (x + (T - lw) // 2, label_y, x + (T - lw) // 2 + lw, label_y + lh)
                    if ri == 0:
                        ops.append(("text", label_box[:2], label, body, INK))
                    ops.append(("tile", box, images[c]))
                    caption = captions[c] if captions else None
                    if caption:
                        cw = int(probe.textlength(caption, font=small))
                        ops.append(("text", (x + (T - cw) // 2, y + T + 2), caption, small, MUTED))
                    tiles.append(Tile(bi, name, c, label, box, label_box, caption))
                y += T + GAP + (sh + 2 if captions else 0)
        y += GAP
    height = y + MARGIN - GAP

    # ---- pass 2: draw
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for op in ops:
        if op[0] == "text":
            draw.text(op[1], op[2], font=op[3], fill=op[4])
        elif op[0] == "mtext":
            draw.multiline_text(op[1], op[2], font=op[3], fill=op[4], spacing=2)
        else:
            box = op[1]
            draw.rectangle((box[0] - 1, box[1] - 1, box[2], box[3]), outline=FRAME)
            sheet.paste(_thumbnail(op[2], T), box[:2])
    return sheet, SheetLayout((width, height), T, tiles)


def tile_pixels(images: torch.Tensor, tile_size: int) -> List[Image.Image]:
    """What :func:`draw_sheet` pastes for ``images [B, 3, H, W]`` (tests compare tiles with it)."""
    return [_thumbnail(image, tile_size) for image in images]
