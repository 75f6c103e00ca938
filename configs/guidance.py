"""Teacher guidance for T2I distillation (paper Section 4): one specialised teacher vs step-wise multi-teacher.

    python -m qwen_flash_jax.main --config=configs/guidance.py:toy,single --workdir=/tmp/qf_single
    python -m qwen_flash_jax.main --config=configs/guidance.py:toy,stepwise --workdir=/tmp/qf_stepwise

"single": the text-specialised teacher replaces the base teacher as the only real score (Section 4.2).
"stepwise": the base teacher anchors the early student steps and the specialist joins later (Section 4.3), the
base config's table. Both are T2I-only, like Qwen-Image-Flash-T2I.
"""

from qwen_flash_jax import config_lib

MODES = ("single", "stepwise")


def get_config(arg=None):
    variant, mode = config_lib.split_arg(arg, MODES, "guidance mode")
    config = config_lib.derive(__file__, arg=variant)
    config.data.task_ratio = "1:0"
    if mode == "single":
        config.guidance.teachers = ("text",)
        config.guidance.weights = (("*", ({"text": 1.0},) * config.student.num_steps),)
    return config
