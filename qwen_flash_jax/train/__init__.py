"""Training jobs, the layer above evaluation: shared assets (text encoder, codec, data sources), the one builder
of a distillation's components (`components`), optimisers, checkpoints, the teacher and distillation jobs, and the
job dispatch of `qwen_flash_jax.main`."""
