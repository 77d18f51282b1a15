"""Models: the ViT encoder, the predictor, and the attention dispatch they share."""
from .attention import attention, attention_reference
from .pos_embed import interpolate_pos_embed, sincos_2d
from .predictor import VisionTransformerPredictor, build_predictor
from .vit import VIT_SIZES, VisionTransformer, ViTSize, build_encoder

__all__ = [
    "VIT_SIZES", "ViTSize", "VisionTransformer", "VisionTransformerPredictor", "attention", "attention_reference",
    "build_encoder", "build_predictor", "interpolate_pos_embed", "sincos_2d",
]
