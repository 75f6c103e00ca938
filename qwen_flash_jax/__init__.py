"""qwen_flash_jax: few-step distillation of Qwen-Image 2.x in JAX/Flax.

`load_transformer(path)` loads a checkpoint written by `python -m qwen_flash_jax.convert`.
"""

from qwen_flash_jax.loading import TransformerModel, build_transformer, from_params, load_transformer

__all__ = ["TransformerModel", "build_transformer", "from_params", "load_transformer"]
