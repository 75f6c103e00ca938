"""T2I-only distillation: Qwen-Image-Flash-T2I, the "zero-shot" row of Tables 3-4 (no edit batches at all)."""

from qwen_flash_jax import config_lib


def get_config(arg=None):
    config = config_lib.derive(__file__, arg=arg)
    config.data.task_ratio = "1:0"
    return config
