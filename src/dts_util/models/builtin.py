"""The built-in default model: a small Stable Diffusion 1.x with seeded random weights.

No weights can be downloaded on the machines dts-util is developed and tested on,
so the server ships this instead. It has the real SD1.x architecture (CLIP text
encoder, UNet with cross-attention, KL VAE with an 8x latent factor, the real CLIP
BPE tokenizer) at a tiny width, so a 20-step image takes well under a second on
two CPU cores. Its images are abstract noise: the weights are random.

It is written to the model store in the diffusers on-disk layout, and from then on
it loads through ``models/loader.py`` like any user model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from dts_util.config import BUILTIN_MODEL_NAME
from dts_util.models.clip_vocab import clip_vocabulary
from dts_util.models.store import MODEL_INDEX, ModelStore, publish_folder

log = logging.getLogger(__name__)

SEED = 20240601
# Latent 32x32 -> 256x256 pixels, the model's native size. Cross-attention only at the
# lower resolution (as SDXL's first block does): full-resolution self-attention made a
# step 4x slower on 2 CPU cores at this width, for no benefit to a random-weight model.
UNET_CONFIG = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=4,
    norm_num_groups=16,
)
# Four blocks: the same 8x downsampling as SD1.x's VAE.
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(16, 32, 64, 64),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    norm_num_groups=16,
    sample_size=256,
    scaling_factor=0.18215,
)
TEXT_ENCODER_CONFIG = dict(
    vocab_size=49408,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)
# SD1.5's own scheduler settings.
SCHEDULER_CONFIG = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    num_train_timesteps=1000, steps_offset=1, set_alpha_to_one=False, skip_prk_steps=True,
)


def _build_pipeline():
    """Construct the tiny SD1.x pipeline in memory with seeded weights."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab, merges = clip_vocabulary()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges], model_max_length=77)
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    torch.manual_seed(SEED + 1)
    vae = AutoencoderKL(**VAE_CONFIG)
    torch.manual_seed(SEED + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIG))
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=PNDMScheduler(**SCHEDULER_CONFIG), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )


def ensure_builtin_model(store: ModelStore, name: str = BUILTIN_MODEL_NAME) -> Path:
    """Create the built-in model in ``store`` unless it is already there; return its folder.

    Written to a temporary folder and renamed into place, so an interrupted
    first run never leaves a half-written model behind.
    """
    target = store.root / name
    if (target / MODEL_INDEX).is_file():
        return target
    log.info("creating the built-in model %r in %s (seeded random weights)", name, store.root)

    def fill(folder: Path) -> None:
        _build_pipeline().save_pretrained(folder, safe_serialization=True)
        # Record where these weights came from, for anyone who finds the folder.
        (folder / "README.md").write_text(
            f"# {name}\n\nBuilt-in dts-util model: Stable Diffusion 1.x architecture at a tiny width "
            f"with random weights (seed {SEED}). Its images are abstract noise.\n"
        )
        (folder / "dts_builtin.json").write_text(json.dumps({"seed": SEED, "unet": UNET_CONFIG}, default=list))

    return publish_folder(target, fill, complete=lambda path: (path / MODEL_INDEX).is_file())
