"""Training jobs, the layer above evaluation: shared assets (text encoder, codec, data sources), optimisers,
checkpoints, the teacher and distillation jobs, and the job dispatch of `qwen_flash_jax.main`."""
