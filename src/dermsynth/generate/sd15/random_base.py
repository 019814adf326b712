"""SD-1.5-shaped pipelines with random weights, built offline: tiny ones for tests, full-size ones for benchmarks.

No Stable Diffusion weights are needed (or downloaded) here. The full-size configs are the published SD-1.5 values
(UNet 860 M, VAE 84 M, CLIP ViT-L/14 text encoder 123 M parameters), so a random-weight model of them has the true
compute and memory cost. The tokenizer is a byte-level CLIP BPE with no merges (every character is a token): valid,
offline and tiny, though a prompt takes more tokens than with the real 49,408-entry vocabulary.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# ----------------------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------------------

SD15_UNET: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    center_input_sample=False, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1,
)
SD15_VAE: dict[str, Any] = dict(
    sample_size=512, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, act_fn="silu", scaling_factor=0.18215,
)
SD15_TEXT: dict[str, Any] = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
    bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
SD15_SCHEDULER: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)

# Tiny: same block types and wiring, a few channels. 32 px images -> 16 px latents (one VAE downsample).
TINY_UNET: dict[str, Any] = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
)
TINY_VAE: dict[str, Any] = dict(
    sample_size=32, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
    scaling_factor=0.18215,
)
TINY_TEXT: dict[str, Any] = dict(
    hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
    hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=32, bos_token_id=0, eos_token_id=2, pad_token_id=1,
)


def byte_clip_tokenizer(model_max_length: int = 77):
    """A CLIP BPE tokenizer whose vocabulary is the 256 byte symbols (plain and word-final) and no merges."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    # transformers 5 ignores vocab_file= here; the vocabulary must be passed as objects
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def random_components(size: str = "tiny", seed: int = 0) -> dict[str, Any]:
    """Tokenizer, text encoder, VAE, UNet and scheduler with random weights; ``size`` is "tiny" or "sd15"."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if size not in ("tiny", "sd15"):
        raise ValueError(f"size must be 'tiny' or 'sd15', got {size!r}")
    tiny = size == "tiny"
    unet_cfg, vae_cfg, text_cfg = (TINY_UNET, TINY_VAE, TINY_TEXT) if tiny else (SD15_UNET, SD15_VAE, SD15_TEXT)
    tokenizer = byte_clip_tokenizer()
    text_cfg = {**text_cfg, "vocab_size": max(text_cfg.get("vocab_size", 0), len(tokenizer))}
    with torch.random.fork_rng(devices=[]):  # the weights depend on ``seed`` only; the caller's RNG is left alone
        torch.manual_seed(seed)
        return {
            "tokenizer": tokenizer,
            "text_encoder": CLIPTextModel(CLIPTextConfig(**text_cfg)).eval(),
            "vae": AutoencoderKL(**vae_cfg).eval(),
            "unet": UNet2DConditionModel(**unet_cfg).eval(),
            "scheduler": PNDMScheduler(**SD15_SCHEDULER),
        }


def random_pipeline(size: str = "tiny", seed: int = 0):
    """A ``StableDiffusionPipeline`` of :func:`random_components` (no safety checker)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(**random_components(size, seed), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def save_random_base(folder: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a random pipeline as a local diffusers folder (model_index.json, unet/, vae/, ...)."""
    folder = Path(folder)
    random_pipeline(size, seed).save_pretrained(folder, safe_serialization=True)
    return folder
