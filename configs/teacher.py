"""Trains one teacher of the base config by flow matching (see `teachers` in configs/5to5.py).

    python -m qwen_flash_jax.main --config=configs/teacher.py:toy --workdir=/tmp/qf_base        # base teacher
    python -m qwen_flash_jax.main --config=configs/teacher.py:toy,text --workdir=/tmp/qf_text   # text specialist

The argument is "<toy|full>[,<teacher name>]"; the name defaults to "base".
"""

from qwen_flash_jax import config_lib


def get_config(arg=None):
    variant, name = config_lib.split_arg(arg, ("base", "text"), "teacher", default="base")
    config = config_lib.derive(__file__, arg=variant)
    config.job = "teacher"
    config.teacher_name = name
    return config
