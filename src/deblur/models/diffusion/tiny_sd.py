"""A tiny random Stable Diffusion 1.5 (+ ControlNet) directory in diffusers format, for smoke tests.

The configs follow diffusers' own pipeline tests (``get_dummy_components`` in
``tests/pipelines/controlnet/test_controlnet.py``): UNet ``block_out_channels=(4, 8)``,
``cross_attention_dim=32``, a 5-layer 32-wide CLIP text model, a 2-level VAE (latents at half
the image size). The CLIP tokenizer's vocabulary and merges are written here (byte-level
symbols, a few merges), so nothing is downloaded. The weights are random: the result runs every
code path of a real SD 1.5 directory in seconds on a CPU and deblurs nothing. diffusers and
transformers (optional, heavy) are imported inside the functions.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

TEXT_WIDTH = 32
TINY_MERGES = ("s h", "a r", "p h", "o t", "o t</w>")


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins of GPT-2/CLIP byte-level BPE, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for _, c in sorted(zip(printable, codes))]


def write_tiny_clip_tokenizer(folder: str | Path) -> Path:
    """``vocab.json`` + ``merges.txt`` of a tiny CLIP BPE tokenizer (model_max_length 77) in ``folder``."""
    from transformers import CLIPTokenizer   # lazy: optional, heavy

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols]
    for merge in TINY_MERGES:
        left, right = merge.split()
        tokens.append(left + right)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(TINY_MERGES) + "\n")
    tokenizer = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_components(seed: int = 0) -> dict:
    """The modules of a tiny random SD 1.5 pipeline (no safety checker), seeded."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel   # lazy: optional, heavy
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer   # lazy: optional, heavy

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH, norm_num_groups=1, attention_head_dim=2)
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(4, 8), in_channels=3, out_channels=3, norm_num_groups=2,
                        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=4, sample_size=32)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer(tmp), model_max_length=77)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        hidden_size=TEXT_WIDTH, intermediate_size=37, layer_norm_eps=1e-5, num_attention_heads=4,
        num_hidden_layers=5, vocab_size=len(tokenizer), max_position_embeddings=77))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


def write_tiny_sd(folder: str | Path, seed: int = 0, controlnet_dir: str | Path | None = None,
                  conditioning_channels: int = 3) -> Path:
    """Save a tiny random SD 1.5 directory (``model_index.json``, unet/, vae/, text_encoder/,
    tokenizer/, scheduler/) at ``folder``; with ``controlnet_dir`` also a ControlNet made
    from its UNet (``ControlNetModel.from_unet``). Returns ``folder``."""
    from diffusers import ControlNetModel, StableDiffusionPipeline   # lazy: optional, heavy

    parts = tiny_components(seed)
    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    if controlnet_dir is not None:
        torch.manual_seed(seed)
        controlnet = ControlNetModel.from_unet(parts["unet"], conditioning_embedding_out_channels=(16, 32),
                                               conditioning_channels=conditioning_channels)
        controlnet.save_pretrained(controlnet_dir, safe_serialization=True)
    return folder
