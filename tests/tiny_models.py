"""Tiny randomly initialised diffusion components built from configs (no downloads), the way
diffusers tests its pipelines."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch


def tiny_clip_tokenizer(directory: Path):
    """A CLIPTokenizer over single characters (no merges), written to ``directory``."""
    from transformers import CLIPTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    symbols = list(string.ascii_lowercase + string.digits + ".,!?'-")
    tokens = ["<|startoftext|>", "<|endoftext|>", "!"] + symbols + [c + "</w>" for c in symbols]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=16)


def tiny_sd_components(tmp_dir: Path, seed: int = 0) -> dict:
    """UNet, VAE, text encoder and tokenizer of a 32x32-latent SD1.5-shaped pipeline."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=2, attention_head_dim=2,
    )
    vae = AutoencoderKL(
        block_out_channels=[4, 8], in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=2,
    )
    tokenizer = tiny_clip_tokenizer(tmp_dir / "tokenizer")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-5,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer), max_position_embeddings=16,
    ))
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": text_encoder.eval(), "tokenizer": tokenizer}


def tiny_sd_pipeline(tmp_dir: Path, scheduler, seed: int = 0):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**tiny_sd_components(tmp_dir, seed), scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_word_tokenizer(max_length: int = 16):
    """A fast word-level tokenizer over letters, standing in for FLUX's T5 tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(string.ascii_lowercase)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_length)


def tiny_flux_text_encoders(tmp_dir: Path):
    """``(tokenizer, text_encoder, tokenizer_2, text_encoder_2)``: tiny CLIP and T5 as FLUX uses them."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer = tiny_clip_tokenizer(tmp_dir / "clip_tokenizer")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-5,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer), max_position_embeddings=77, projection_dim=32,
    ))
    tokenizer_2 = tiny_word_tokenizer()
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4))
    return tokenizer, text_encoder, tokenizer_2, text_encoder_2


def tiny_flux_pipeline(tmp_dir: Path, scheduler, seed: int = 0):
    """A FluxPipeline (FLUX.1 architecture: MMDiT transformer, CLIP + T5 encoders, 1-channel
    VAE) with tiny random components, as diffusers' own Flux tests build it."""
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                         num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                         axes_dims_rope=[4, 4, 8])
    tokenizer, text_encoder, tokenizer_2, text_encoder_2 = tiny_flux_text_encoders(tmp_dir)
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2.eval(), tokenizer_2=tokenizer_2, transformer=transformer.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_kontext_pipeline(tmp_dir: Path, seed: int = 0):
    """A FluxKontextPipeline with tiny random components (guidance-embedding transformer as
    FLUX.1-Kontext-dev, CLIP + T5 encoders, a 2-channel VAE with 2x downsampling) and the
    Kontext-dev scheduler config (shift 3, dynamic shifting)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=True)
    tokenizer, text_encoder, tokenizer_2, text_encoder_2 = tiny_flux_text_encoders(tmp_dir)
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4, 8), layers_per_block=1,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=2, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxKontextPipeline(scheduler=scheduler, vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                               text_encoder_2=text_encoder_2.eval(), tokenizer_2=tokenizer_2,
                               transformer=transformer.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------- class-conditional / unconditional image models
#
# Pipeline directories for the ``diffusers`` backend, written with save_pretrained exactly as a
# user's download (or another engineer's trained model) is laid out.

#: class names of the tiny class-conditional models: id -> comma-separated synonyms (DiT style)
TINY_ID2LABEL = {"0": "red circle, crimson disc", "1": "blue square", "2": "green triangle", "3": "tabby cat, tabby"}


def add_to_model_index(directory: Path, **entries) -> None:
    """Add keys (e.g. ``id2label``) to a saved pipeline's ``model_index.json``."""
    path = Path(directory) / "model_index.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **entries), indent=2))


def tiny_unet2d(in_channels: int = 3, sample_size: int = 8, num_class_embeds=None, seed: int = 0):
    """A 2-level UNet2DModel (no attention) with a sinusoidal time embedding that matters."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
                       block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       num_class_embeds=num_class_embeds).eval()


def tiny_ddpm_dir(directory: Path, num_class_embeds=None, prediction_type: str = "epsilon", seed: int = 0,
                  sd15_betas: bool = False) -> Path:
    """A DDPMPipeline (pixel-space UNet2DModel, 3x8x8, DDPMScheduler) saved to ``directory``;
    class-conditional with ``num_class_embeds`` (the last row the null class, ``TINY_ID2LABEL``
    added to model_index.json). ``sd15_betas``: SD1.5's scaled_linear 0.00085..0.012 (the toy
    world's trained model), else google/ddpm-cifar10-32's linear 1e-4..0.02 with clip_sample."""
    from diffusers import DDPMPipeline, DDPMScheduler

    betas = (dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False) if sd15_betas
             else dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, clip_sample=True))
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type, **betas)
    DDPMPipeline(unet=tiny_unet2d(num_class_embeds=num_class_embeds, seed=seed), scheduler=scheduler).save_pretrained(
        directory, safe_serialization=True)
    if num_class_embeds is not None:
        add_to_model_index(directory, id2label=TINY_ID2LABEL)
    return Path(directory)


def tiny_ldm_dir(directory: Path, autoencoder: str = "vq", seed: int = 0) -> Path:
    """An LDMPipeline-shaped directory: UNet2DModel on 3x8x8 latents + a VQModel (``"vq"``, folder
    ``vqvae/``) or an AutoencoderKL (``"kl"``, folder ``vae/``) downsampling by 2, DDIMScheduler."""
    from diffusers import AutoencoderKL, DDIMScheduler, LDMPipeline, VQModel

    torch.manual_seed(seed + 1)
    common = dict(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1, latent_channels=3,
                  norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    scheduler = DDIMScheduler(beta_schedule="linear", beta_start=0.0015, beta_end=0.0195, clip_sample=False)
    unet = tiny_unet2d(in_channels=3, sample_size=8, seed=seed)
    if autoencoder == "vq":
        LDMPipeline(vqvae=VQModel(num_vq_embeddings=32, scaling_factor=0.7, **common).eval(), unet=unet,
                    scheduler=scheduler).save_pretrained(directory, safe_serialization=True)
    else:
        from diffusers import DDPMPipeline

        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(directory, safe_serialization=True)
        AutoencoderKL(scaling_factor=0.5, **common).eval().save_pretrained(Path(directory) / "vae", safe_serialization=True)
        add_to_model_index(directory, vae=["diffusers", "AutoencoderKL"])
    return Path(directory)


def tiny_dit_dir(directory: Path, seed: int = 0) -> Path:
    """A DiTPipeline (DiTTransformer2DModel with learned sigma on 4x8x8 latents, 1000 classes as
    ImageNet so DiTPipeline's hard-coded null class 1000 applies; an AutoencoderKL downsampling by 2;
    DDIMScheduler with DiT's linear betas) saved to ``directory``, ``TINY_ID2LABEL`` in model_index.json."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=1000).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
                        norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2).eval()
    scheduler = DDIMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, clip_sample=False)
    DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler).save_pretrained(directory, safe_serialization=True)
    add_to_model_index(directory, id2label=TINY_ID2LABEL)
    return Path(directory)
