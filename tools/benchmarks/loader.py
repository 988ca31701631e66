"""Shard loader throughput (``ShardDataModule``'s ``ShardLoader``, 2 workers, batch 32, shuffle
buffer 256, CRC checks on) next to the rate training consumes samples.

Samples are synthetic but shaped like the real ones, written with the real ``encode_sample``:

- ``toy``: 3x32x32 noise + target latents, a 32x32 PNG, cached toy features (pixel_psnr
  3x32x32 f32, toy_depth 32x32 f32, toy_seg 32x32 u8).
- ``sd15``: 4x64x64 noise + target latents, a 512x512 PNG (smooth shapes + sensor-like noise),
  a 768-d f32 embedding (CLIP-like feature); ``+png`` rows also decode ``target.png``.
- ``sd15+depth``: as ``sd15`` plus a cached 518x518 f32 depth map (Depth-Anything input size).

Loader rate = samples / wall time of one full epoch, including worker start-up.

Training consumption (upper bound, one K=4 rollout per sample, the policy itself is negligible):
- toy: measured here: 4 guided ``ToyBackend.predict`` calls + decode + pixel_psnr score, batch 32.
- sd15: per-sample FLOPs counted on the meta device (SD1.5-shaped UNet x 2 for CFG x 4 steps +
  VAE decode at 512x512, reward network not included) at an assumed sustained 150 TFLOP/s
  (bf16, ~half an A100's peak / ~15% of an H100's). With CUDA it is also measured
  (random weights, fp16, batch 16).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from consolver.data.format import FORMAT_VERSION, encode_sample
from consolver.data.reader import ShardStream, StreamSpec
from consolver.data.datamodule import ShardLoader
from consolver.data.writer import SHARD_PATTERN

ASSUMED_TFLOPS = 150.0
K = 4


def _image(size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 ``[size, size, 3]``: smooth colour field + discs + mild noise (PNG-realistic)."""
    field = F.interpolate(torch.from_numpy(rng.random((1, 3, 6, 6), dtype=np.float32)), size=(size, size),
                          mode="bicubic").clamp(0, 1)[0].permute(1, 2, 0).numpy()
    yy, xx = np.mgrid[:size, :size] / size
    for _ in range(4):
        cx, cy, r = rng.random(3) * [1, 1, 0.3]
        field[(xx - cx) ** 2 + (yy - cy) ** 2 < r**2] = rng.random(3)
    noisy = field * 255 + rng.normal(0, 2.0, field.shape)
    return noisy.clip(0, 255).round().astype(np.uint8)


def _write_shards(kind: str, n: int, root: Path) -> tuple[list[str], int]:
    """``n`` synthetic samples of ``kind`` in shards of 128; returns (urls, bytes per sample)."""
    import webdataset as wds

    rng = np.random.default_rng(0)
    latent, size = ((3, 32, 32), 32) if kind == "toy" else ((4, 64, 64), 512)
    images = [_image(size, rng) for _ in range(8)]  # PNG encoding is slow; reuse a few
    meta = {"backend": kind, "format_version": FORMAT_VERSION, "noise_seed": 0}
    urls = []
    for shard in range(0, n, 128):
        path = root / (SHARD_PATTERN % (shard // 128))
        with wds.TarWriter(str(path), encoder=False, mtime=0) as sink:
            for i in range(shard, min(shard + 128, n)):
                if kind == "toy":
                    feats = {"pixel_psnr": rng.random((3, 32, 32), dtype=np.float32),
                             "toy_depth": rng.random((32, 32), dtype=np.float32),
                             "toy_seg": rng.integers(0, 6, (32, 32), dtype=np.uint8)}
                else:
                    feats = {"clip": rng.standard_normal(768, dtype=np.float32)}
                    if kind == "sd15+depth":
                        feats["depth"] = rng.random((518, 518), dtype=np.float32)
                sink.write(encode_sample(i, "a prompt of typical length for a text to image model", rng.standard_normal(
                    latent, dtype=np.float32), rng.standard_normal(latent, dtype=np.float32), images[i % 8], feats, meta))
        urls.append(str(path))
    return urls, sum(Path(u).stat().st_size for u in urls) // n


def loader_rate(urls: list[str], kind: str, load_target_image: bool, workers: int = 2) -> float:
    spec = StreamSpec(urls=urls, expected_meta={"backend": kind}, batch_size=32, shuffle_buffer=256,
                      load_target_image=load_target_image)
    start, n = time.perf_counter(), 0
    for batch in ShardLoader(ShardStream(spec), num_workers=workers):
        n += len(batch["key"])
    return n / (time.perf_counter() - start)


def toy_consumption(batch: int = 32) -> float:
    """Samples/s of K-step toy rollouts (guided predict x K, decode, pixel_psnr score)."""
    from consolver.backends.toy import ToyBackend
    from consolver.rewards.pixel import PixelPSNR

    backend, reward = ToyBackend(), PixelPSNR()
    prompts = (backend.prompts("train") * batch)[:batch]
    cond, x = backend.encode(prompts), torch.randn(batch, *backend.latent_shape)
    target = backend.decode(torch.randn_like(x))
    timesteps = backend.schedule.timesteps(K)

    def rollout():
        y = x
        for t in timesteps:
            y = y - 0.1 * backend.predict(y, int(t), cond, 3.0)
        return reward.score(backend.decode(y), target)

    from benchmarks._timing import time_call

    return batch / time_call(rollout, repeats=10, warmup=2)


def sd15_flops_per_sample() -> float:
    """FLOPs of one K-step CFG rollout + VAE decode of an SD1.5-shaped model (meta device)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
        vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                            up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, layers_per_block=2)
        with FlopCounterMode(display=False) as unet_flops:
            unet(torch.randn(2, 4, 64, 64), torch.tensor([500, 500]), torch.randn(2, 77, 768))
        with FlopCounterMode(display=False) as vae_flops:
            vae.decode(torch.randn(1, 4, 64, 64))
    return K * unet_flops.get_total_flops() + vae_flops.get_total_flops()  # 2 CFG rows = 1 sample


def sd15_consumption_cuda(batch: int = 16) -> float:
    """Measured samples/s of K-step CFG rollouts + decode, SD1.5-shaped, random fp16 weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from benchmarks._timing import time_call

    kw = dict(device="cuda", dtype=torch.float16)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768).to(**kw).eval()
    vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, layers_per_block=2).to(**kw).eval()
    x, emb = torch.randn(batch, 4, 64, 64, **kw), torch.randn(2 * batch, 77, 768, **kw)

    @torch.no_grad()
    def rollout():
        y = x
        for t in (999, 749, 499, 249):
            d = unet(torch.cat([y, y]), t, emb).sample
            y = y - 0.1 * (d[:batch] + 3.0 * (d[batch:] - d[:batch]))
        return vae.decode(y).sample

    return batch / time_call(rollout, repeats=5, warmup=1)


def run(quick: bool = False) -> list[dict]:
    counts = {"toy": 1024 if quick else 4096, "sd15": 256 if quick else 1024, "sd15+depth": 128 if quick else 512}
    toy_rate = toy_consumption()
    sd_estimate = ASSUMED_TFLOPS * 1e12 / sd15_flops_per_sample()
    sd_how = f"FLOP count at {ASSUMED_TFLOPS:g} TFLOP/s (assumed)"
    if torch.cuda.is_available():
        sd_estimate, sd_how = sd15_consumption_cuda(), f"measured on {torch.cuda.get_device_name()}"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, n in counts.items():
            root = Path(tmp) / kind.replace("+", "_")
            root.mkdir()
            urls, size = _write_shards(kind, n, root)
            for png in ([False] if kind == "toy" else [False, True]):
                rows.append({
                    "samples": kind + ("+png" if png or kind == "toy" else ""), "kB/sample": size / 1e3, "n": n,
                    "loader samples/s (2 workers)": loader_rate(urls, kind, load_target_image=png or kind == "toy"),
                    "training consumes samples/s": toy_rate if kind == "toy" else sd_estimate,
                    "consumption from": "measured K=4 toy rollout, CPU" if kind == "toy" else sd_how,
                })
    return rows
