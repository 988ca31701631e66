"""FLUX latent packing: 2x2 patches of a latent image as a token sequence, and the positional
ids the transformer's rotary embedding reads (as diffusers' ``FluxKontextPipeline`` does).

    tokens = pack(latents)                    # [B, C, h, w] -> [B, (h/2)(w/2), 4C]
    latents = unpack(tokens, h, w)            # the inverse
    ids = image_ids(h, w)                     # [(h/2)(w/2), 3] float: (index, row, col)
    ref_ids = image_ids(h, w, index=1)        # a Kontext reference image's ids: first axis 1

A Kontext transformer sees ``cat([target tokens, reference tokens], dim=1)`` with
``cat([ids, ref_ids], dim=0)`` and its output keeps the first ``(h/2)(w/2)`` tokens.
"""

from __future__ import annotations

import torch


def pack(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` (h, w even) -> ``[B, (h/2)(w/2), 4C]``, channel-major within each patch."""
    B, C, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"packing needs an even latent size, got {h}x{w}")
    x = latents.reshape(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (h // 2) * (w // 2), C * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``[B, (h/2)(w/2), 4C]`` -> ``[B, C, h, w]`` (inverse of :func:`pack`)."""
    B, L, D = tokens.shape
    if L != (h // 2) * (w // 2) or D % 4:
        raise ValueError(f"{L} tokens of width {D} do not unpack to a {h}x{w} latent")
    x = tokens.reshape(B, h // 2, w // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, D // 4, h, w)


def image_ids(h: int, w: int, index: int = 0, device=None, dtype=torch.float32) -> torch.Tensor:
    """Positional ids ``[(h/2)(w/2), 3]``: ``(index, row, column)`` of each packed token; ``index``
    is 0 for the image being generated and 1 for a Kontext reference image."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


__all__ = ["image_ids", "pack", "unpack"]
