"""A tiny random Qwen-Image 2.1 diffusers pipeline folder, and a training workdir whose student differs from its
transformer: for the export and generate tests (a test module imports these from here, never from another test).

The folder holds everything `QwenImage21Pipeline.from_pretrained` reads: `model_index.json`, a 2-layer transformer,
a tiny VAE, a tiny Qwen3-VL text encoder with its vision tower, a locally trained tokenizer, a processor config and
a scheduler config with non-default shift anchors and a terminal stretch. Needs torch, diffusers and transformers.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np

from qwen_flash_jax import config_lib, distilled, export
from qwen_flash_jax.distill import steps as steps_lib
from qwen_flash_jax.models import hf_keys
from qwen_flash_jax.models.config import TransformerConfig
from qwen_flash_jax.text import prompts
from qwen_flash_jax.text import tokenizer as tokenizer_lib
from qwen_flash_jax.train import optim
from qwen_flash_jax.train.checkpoint import Checkpointer

TEXT_WIDTH = 32
LATENT_CHANNELS = 8
TRANSFORMER = dict(
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    in_channels=LATENT_CHANNELS,
    out_channels=LATENT_CHANNELS,
    context_in_dim=TEXT_WIDTH,
    axes_dims_rope=(4, 6, 6),
)
SCHEDULER = dict(
    _class_name="FlowMatchEulerDiscreteScheduler",
    num_train_timesteps=1000,
    shift=1.0,
    use_dynamic_shifting=True,
    base_shift=0.4,
    max_shift=0.9,
    base_image_seq_len=16,
    max_image_seq_len=8192,
    shift_terminal=0.02,
    time_shift_type="exponential",
    stochastic_sampling=False,
)
# The processor's settings; its pixel limits admit tiny condition images (the published ones start at 256x256).
IMAGE_PROCESSOR = dict(
    image_mean=[0.5] * 3,
    image_std=[0.5] * 3,
    patch_size=16,
    merge_size=2,
    temporal_patch_size=2,
    size=dict(shortest_edge=32 * 32, longest_edge=1024 * 1024),
)
CAPTIONS = ["a red house by a lake", "a portrait of a smiling man", "a sign reading OPEN", "a dark forest"]


def randomise(model, seed):
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", "gamma")) or "layernorm" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.copy_(torch.randn_like(param) * min(0.2, param[0].numel() ** -0.5))
    return model


def tiny_qwen3_vl(texts):
    """(a tiny random Qwen3-VL with a 1-block vision tower, a Qwen-style tokenizer trained on `texts` whose vision
    tokens' ids the model's config names)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    tok = tokenizer_lib.train_tokenizer(texts, vocab_size=300)
    ids = {t: prompts.special_token_id(tok, t) for t in tokenizer_lib.SPECIAL_TOKENS}
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=320,
            hidden_size=TEXT_WIDTH,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=512,
            rope_parameters=dict(rope_type="default", rope_theta=1e4, mrope_section=[2, 1, 1], mrope_interleaved=True),
        ),
        vision_config=dict(
            depth=1,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            out_hidden_size=TEXT_WIDTH,
            patch_size=16,
            spatial_merge_size=2,
            num_position_embeddings=16,
            deepstack_visual_indexes=[0],
        ),
        image_token_id=ids[prompts.IMAGE_PAD],
        vision_start_token_id=ids[prompts.VISION_START],
        vision_end_token_id=ids[prompts.VISION_END],
        video_token_id=319,
    )
    return randomise(Qwen3VLForConditionalGeneration(config).eval(), 0), tok


def _text_encoder(folder):
    model, tok = tiny_qwen3_vl(CAPTIONS)
    model.save_pretrained(folder / "text_encoder")
    tok.save_pretrained(folder / "tokenizer")
    (folder / "processor").mkdir()
    tok.save_pretrained(folder / "processor")
    processor = dict(
        image_processor=IMAGE_PROCESSOR,
        processor_class="Qwen3VLProcessor",
    )
    (folder / "processor" / "processor_config.json").write_text(json.dumps(processor))


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'][0]['text'] }}<|im_end|>\n{% endfor %}"
)


def processor(folder):
    """The folder's `Qwen3VLProcessor`, built by hand: transformers' own loading of it imports torchvision, which
    does not load against this torch, so its class check is bypassed (the processor itself is transformers')."""
    from transformers import AutoTokenizer, ProcessorMixin, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    settings = json.loads((folder / "processor" / "processor_config.json").read_text())["image_processor"]
    image_processor = Qwen2VLImageProcessorPil(**settings)
    tokenizer = AutoTokenizer.from_pretrained(folder / "processor")

    class VideoStub:  # read for its merge sizes only; no videos here
        merge_size, temporal_patch_size = 2, 2

    check = ProcessorMixin.check_argument_for_proper_class
    ProcessorMixin.check_argument_for_proper_class = lambda self, name, arg: None
    try:
        return Qwen3VLProcessor(image_processor, tokenizer, VideoStub(), chat_template=CHAT_TEMPLATE)
    finally:
        ProcessorMixin.check_argument_for_proper_class = check


def _vae(folder):
    from diffusers import AutoencoderKLQwenImage21

    vae = AutoencoderKLQwenImage21(
        base_dim=8,
        z_dim=LATENT_CHANNELS,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        patch_size=2,
        in_channels=16,
        out_channels=16,
        latents_mean=[0.1] * LATENT_CHANNELS,
        latents_std=[1.5] * LATENT_CHANNELS,
        scale_factor_spatial=16,
    )
    randomise(vae.eval(), 1).save_pretrained(folder / "vae")


def pipeline_folder(folder):
    """Writes the tiny pipeline into `folder` (created); returns it."""
    from diffusers import QwenImage21Transformer2DModel

    folder.mkdir(parents=True)
    randomise(QwenImage21Transformer2DModel(**TRANSFORMER).eval(), 2).save_pretrained(folder / "transformer")
    _vae(folder)
    _text_encoder(folder)
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    index = dict(
        _class_name="QwenImage21Pipeline",
        _diffusers_version="0.42.1",
        processor=["transformers", "Qwen3VLProcessor"],
        scheduler=["diffusers", "FlowMatchEulerDiscreteScheduler"],
        text_encoder=["transformers", "Qwen3VLForConditionalGeneration"],
        transformer=["diffusers", "QwenImage21Transformer2DModel"],
        vae=["diffusers", "AutoencoderKLQwenImage21"],
        sample_sigmas=None,
    )
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def transformer_params(folder) -> dict:
    """The folder's transformer weights in our layout (float32 numpy)."""
    from safetensors.numpy import load_file

    state = {}
    for path in sorted((folder / "transformer").glob("*.safetensors")):
        state.update(load_file(str(path)))
    return hf_keys.state_dict_to_params(state, TransformerConfig(**TRANSFORMER), np.float32)


def perturbed(params, seed, scale=0.05):
    """`params` plus a low-rank-ish random change per matrix (so that the LoRA error falls with the rank) and a
    small change of every norm scale."""
    rng = np.random.default_rng(seed)

    def change(x):
        x = np.asarray(x, np.float32)
        if x.ndim >= 2:
            rank = 3
            a = rng.normal(size=(*x.shape[:-1], rank)).astype(np.float32)
            b = rng.normal(size=(*x.shape[:-2], rank, x.shape[-1])).astype(np.float32)
            low = (a @ b) / np.sqrt(rank * x.shape[-1])
            return x + scale * low + 0.1 * scale * rng.normal(size=x.shape).astype(np.float32) / np.sqrt(x.shape[-1])
        return x + scale * rng.normal(size=x.shape).astype(np.float32)

    return jax.tree.map(lambda x: change(x).astype(np.float32), params)


class _Iterator:
    def get_state(self):
        return {}


def training_workdir(workdir, student, ema=None, step=5):
    """A distillation workdir whose latest checkpoint (a `DistillState`, saved as the job saves it) holds
    `student` and, if given, its EMA `ema`."""
    config = config_lib.load_config("configs/5to5.py")
    opt = optim.from_config(config.optim, 10, 1e-4)
    setup = steps_lib.DistillSetup(
        model=None,
        student_opt=opt,
        fake_opt=opt,
        timesteps=(1.0,),
        guidance=None,
        teacher_names=("base",),
        cfg_scale=1.0,
        cfg_rescale=0.0,
        t_min=0.02,
        t_max=0.98,
        ema_decay=0.5 if ema is not None else 0.0,
        first_step_fm_weight=0.0,
        disc_opt=opt,
    )
    as_jax = lambda tree: jax.tree.map(jnp.asarray, tree)  # noqa: E731
    state = steps_lib.initial_state(
        setup, as_jax(student), as_jax(student), {"w": jnp.zeros(3)}, jax.random.key_data(jax.random.key(0))
    )
    if ema is not None:
        state = state.replace(ema=as_jax(ema))
    checkpointer = Checkpointer(workdir / "checkpoints", every=1, async_save=False)
    checkpointer.maybe_save(step, state, _Iterator(), {"step": step}, force=True)
    checkpointer.close()
    return workdir


def config_args(**student):
    """The `--config` arguments of a full-scale run (configs/5to5.py) with `student` fields overridden."""
    return ["--config=configs/5to5.py"] + [f"--config.student.{k}={v!r}" for k, v in student.items()]


def exported_student(root, perturb_seed=None):
    """(a tiny pipeline folder, the student folder `export` writes from it): the student is the folder's own
    transformer, or a perturbed copy with `perturb_seed`, exported as the main job's config exports it."""
    base = pipeline_folder(root / "qwen_image_21")
    params = transformer_params(base)
    if perturb_seed is not None:
        params = perturbed(params, perturb_seed)
    workdir = training_workdir(root / "run", params)
    export.export(workdir, base, root / "student", config=distilled.load_run_config("configs/5to5.py"))
    return base, root / "student"
