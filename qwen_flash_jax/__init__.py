"""qwen_flash_jax: few-step distillation of Qwen-Image 2.x in JAX/Flax."""
