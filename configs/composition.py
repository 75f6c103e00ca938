"""Data composition of T2I distillation, the paper's Table 1 (E1-E5): T2I only, the base teacher alone.

    python -m qwen_flash_jax.main --config=configs/composition.py:toy,E3 --workdir=/tmp/qf_E3

The argument is "<toy|full>,<E1..E5>".
"""

from qwen_flash_jax import config_lib

COMPOSITIONS = {
    "E1": {"landscape": 1.0},
    "E2": {"portrait": 1.0},
    "E3": {"text": 1.0},
    "E4": {"landscape": 1.0, "portrait": 1.0},
    "E5": {"landscape": 1.0, "portrait": 1.0, "text": 1.0},
}


def get_config(arg=None):
    variant, experiment = config_lib.split_arg(arg, COMPOSITIONS, "composition")
    config = config_lib.derive(__file__, arg=variant)
    config.data.task_ratio = "1:0"
    config.data.t2i_weights = COMPOSITIONS[experiment]
    config.guidance.teachers = ("base",)
    config.guidance.weights = (("*", ({"base": 1.0},) * config.student.num_steps),)
    return config
