"""dit_fast.models: DiTVideo, its named configs, DiT checkpoint loading, a small text encoder.

    from dit_fast.models import DiT_models, load_dit_checkpoint
    model = DiT_models["DiT-S/1x2x2-video"](text_dim=128, backend="triton")
    dit = load_dit_checkpoint("DiT-XL-2-256x256.pt")          # facebookresearch/DiT weights
"""

from dit_fast.models.checkpoint import (CheckpointError, check_state_dict, infer_dit_config, load_dit_checkpoint,
                                        read_safetensors, read_state_dict)
from dit_fast.models.dit_video import DiT_models, DiTVideo, DiTVideoBlock, FinalLayer
from dit_fast.models.embeddings import get_3d_sincos_pos_embed
from dit_fast.models.patching import patch
from dit_fast.models.text import TextEncoder, Tokenizer

__all__ = ["DiTVideo", "DiTVideoBlock", "FinalLayer", "DiT_models", "load_dit_checkpoint", "infer_dit_config",
           "CheckpointError", "check_state_dict", "read_state_dict", "read_safetensors",
           "get_3d_sincos_pos_embed", "patch", "TextEncoder", "Tokenizer"]
