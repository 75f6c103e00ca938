"""Joint distillation at T2I:Edit = 7:3 (paper Tables 3-4); everything else as configs/5to5.py."""

from qwen_flash_jax import config_lib


def get_config(arg=None):
    config = config_lib.derive(__file__, arg=arg)
    config.data.task_ratio = "7:3"
    return config
