"""Network definitions: the Qwen-Image 2.x transformer and its token layout."""

from qwen_flash_jax.models.config import ConfigError, TransformerConfig
from qwen_flash_jax.models.layout import LayoutError, TokenLayout, make_layout
from qwen_flash_jax.models.transformer import QwenImageTransformer

__all__ = ["ConfigError", "LayoutError", "QwenImageTransformer", "TokenLayout", "TransformerConfig", "make_layout"]
