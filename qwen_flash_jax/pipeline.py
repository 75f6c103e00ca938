"""`Pipeline`: a diffusers Qwen-Image 2.1 pipeline folder run end to end in JAX, as `QwenImage21Pipeline` runs it.

    pipe = Pipeline.from_pretrained("/path/to/Qwen-Image-2.1", dtype="bfloat16")
    images = pipe(prompt="a red fox", num_inference_steps=40).images               # (B, H, W, 4) float in [0, 1]
    edit = pipe(prompt="make it blue", image=[pil_or_uint8_array, ...]).images      # 1..n condition images

The folder's components are read directly: `model_index.json` (its `sample_sigmas`), `transformer/` (streamed from
diffusers safetensors through the converter's plan, or an already converted checkpoint), `vae/`, `text_encoder/`
(Qwen3-VL with its vision tower), `processor/` (tokenizer and image-processor settings; `tokenizer/` also works)
and `scheduler/` (`diffusion.scheduler.FlowMatchScheduler`).

The call's arguments mean what they mean in diffusers: `latents` in diffusers' packed (B, h*w, C) layout, so both
pipelines can start from the same noise; `image` one set of condition images shared by every prompt; the output
size from the last condition image at about `output_resolution`**2 pixels, floored to multiples of 32; true CFG
only with a negative prompt and `true_cfg_scale > 1`. One difference, on purpose: a batch of prompts of different
lengths gives each prompt exactly the image it gets alone (per-sample RoPE positions), whereas diffusers' batched
call moves a shorter prompt's image positions by its padding.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qwen_flash_jax import checkpoint_io, convert
from qwen_flash_jax.data import edit_images
from qwen_flash_jax.diffusion import conditioning as conditioning_lib
from qwen_flash_jax.diffusion import sampling
from qwen_flash_jax.diffusion.sampling import Conditioning
from qwen_flash_jax.diffusion.scheduler import FlowMatchScheduler
from qwen_flash_jax.errors import CheckpointError
from qwen_flash_jax.loading import TransformerModel, from_params, load_transformer
from qwen_flash_jax.models import hf_keys
from qwen_flash_jax.models.config import ConfigError, read_config_json, read_json_object
from qwen_flash_jax.models.vae_io import VAECodec, load_vae
from qwen_flash_jax.safetensors_checkpoint import SafetensorsCheckpoint
from qwen_flash_jax.text import prompts as prompts_lib
from qwen_flash_jax.text import qwen3_vl
from qwen_flash_jax.text import qwen3_vl_vision as vision_lib

DTYPES = ("float32", "bfloat16")
OUTPUT_TYPES = ("np", "pil", "latent")
MODEL_INDEX = "model_index.json"
COMPONENTS = ("transformer", "vae", "text_encoder", "scheduler")
PIPELINE_CLASS = "QwenImage21Pipeline"
SIZE_MULTIPLE = edit_images.SIZE_MULTIPLE


@dataclasses.dataclass
class PipelineOutput:
    images: Any  # np: (B, H, W, C) float32 in [0, 1]; pil: list of PIL images; latent: (B, h*w, C) packed


@dataclasses.dataclass(eq=False)
class Pipeline:
    transformer: TransformerModel
    vae: VAECodec
    text_encoder: qwen3_vl.Qwen3VLParams
    tokenizer: Any
    scheduler: FlowMatchScheduler
    path: Path | None = None

    # --- loading ------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: str = "bfloat16", mesh=None, rules=()) -> "Pipeline":
        """Reads a diffusers Qwen-Image 2.1 pipeline folder (or one written by `qwen_flash_jax.export`). With a
        `mesh`, the transformer and text encoder load straight into their shardings (`rules`: logical axis rules).
        Raises ConfigError (one line) for a missing folder or component or a component of the wrong kind."""
        if dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        path = Path(path)
        if not path.is_dir():
            raise ConfigError(f"pipeline folder {path} does not exist or is not a directory")
        _model_index(path)  # a pipeline folder of the right class; its sample_sigmas go to the scheduler
        missing = [c for c in COMPONENTS if not (path / c).is_dir()]
        if missing:
            raise ConfigError(f"pipeline folder {path} has no {', '.join(c + '/' for c in missing)}")
        scheduler = FlowMatchScheduler.from_pretrained(path)
        transformer = load_pipeline_transformer(path / "transformer", dtype, mesh, rules)
        vae = VAECodec(load_vae(path / "vae", dtype=dtype, param_dtype=dtype), rgb=False)
        text_encoder = _load_text_encoder(path, dtype, mesh, rules)
        tokenizer = _load_tokenizer(path)
        return cls(transformer, vae, text_encoder, tokenizer, scheduler, path)

    # --- the call ---------------------------------------------------------------------------------------------------
    def __call__(
        self,
        prompt: str | list[str] = None,
        image=None,
        negative_prompt: str | list[str] | None = None,
        true_cfg_scale: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 40,
        sigmas=None,
        latents=None,
        seed: int = 0,
        output_type: str = "np",
        use_kv_cache: bool = True,
        output_resolution: int = 1024,
    ) -> PipelineOutput:
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        prompts = _prompt_list(prompt, "prompt")
        batch = len(prompts)
        do_cfg = true_cfg_scale > 1 and negative_prompt is not None
        negatives = _prompt_list(negative_prompt, "negative_prompt") if do_cfg else []
        if negatives and len(negatives) == 1 and batch > 1:
            negatives = negatives * batch
        if negatives and len(negatives) != batch:
            raise ValueError(f"{len(negatives)} negative prompts for {batch} prompts")
        # All prompts (and negatives) padded to one length: one token layout, per-sample positions.
        both = self.conditioning(prompts + negatives, image, height, width, output_resolution)
        cond = jax.tree.map(lambda x: x[:batch], both)
        neg = jax.tree.map(lambda x: x[batch:], both) if do_cfg else None
        h, w = cond.layout.img_shapes[-1][1:]
        height, width = h * self.vae.scale_factor, w * self.vae.scale_factor
        target_tokens, channels = h * w, self.vae.channels

        if latents is None:
            noise = jax.random.normal(jax.random.key(seed), (batch, target_tokens, channels), jnp.float32)
        else:
            noise = jnp.asarray(latents, jnp.float32)
            if noise.shape != (batch, target_tokens, channels):
                raise ValueError(
                    f"latents must be packed (B={batch}, h*w={target_tokens}, C={channels}) for a "
                    f"{height}x{width} image, got {tuple(noise.shape)}"
                )
        schedule = self.scheduler.sigmas(num_inference_steps, target_tokens, sigmas)
        sample = _sampler(
            self.transformer,
            tuple(float(s) for s in schedule),
            float(true_cfg_scale) if do_cfg else 1.0,
            bool(use_kv_cache),
            self.scheduler,
        )(self.transformer.params, noise, cond, neg, jax.random.key(seed + 1))
        if output_type == "latent":
            return PipelineOutput(np.asarray(sample))
        decoded = self.vae.decode(self.vae.unpack(sample, h, w))
        images = np.asarray(jnp.clip(decoded / 2 + 0.5, 0.0, 1.0), np.float32)
        if output_type == "pil":
            from PIL import Image

            mode = "RGBA" if images.shape[-1] == 4 else "RGB"
            images = [Image.fromarray(np.round(x * 255).astype(np.uint8), mode) for x in images]
        return PipelineOutput(images)

    # --- conditioning -------------------------------------------------------------------------------------------
    def conditioning(
        self, prompts: list[str], image=None, height=None, width=None, output_resolution: int = 1024
    ) -> Conditioning:
        """What the transformer reads for `prompts` (one row each) and the shared condition images `image`: the
        prompt states, the condition images' packed VAE latents and the token layout, the output's size from the
        last image (or `height` x `width`), as `diffusion.conditioning.edit_spec` lays out a training edit."""
        conditions = _condition_images(image)
        if conditions:
            auto_h, auto_w = edit_images.output_size(output_resolution, [img.shape[:2] for img in conditions])
            height, width = height or auto_h, width or auto_w
        height, width = height or output_resolution, width or output_resolution
        height, width = height // SIZE_MULTIPLE * SIZE_MULTIPLE, width // SIZE_MULTIPLE * SIZE_MULTIPLE
        h, w, channels = self.vae.latent_shape(height, width)
        # Condition images: one resize (about output_resolution**2 pixels at its own aspect ratio) feeds both the
        # vision tower (alpha over white) and the VAE (RGBA).
        resized = []
        for img in conditions:
            size = edit_images.condition_size(output_resolution, *img.shape[:2])
            resized.append(edit_images.resize(img, size[1], size[0]))
        embeds, mask, slots = self.encode_prompt(prompts, resized)
        condition_hw = [self.vae.latent_shape(*img.shape[:2])[:2] for img in resized]
        layout = conditioning_lib.token_layout(slots, condition_hw, (h, w))
        batch = len(prompts)
        condition_latents = jnp.zeros((batch, 0, channels), jnp.float32)
        if resized:
            packed = edit_images.pack_condition_latents(self.vae, [edit_images.rgba(img)[None] for img in resized])
            condition_latents = jnp.broadcast_to(jnp.asarray(packed), (batch,) + packed.shape[1:])
        return Conditioning(jnp.asarray(embeds), jnp.asarray(mask), condition_latents, layout)

    # --- prompt encoding ----------------------------------------------------------------------------------------
    def encode_prompt(self, prompts: list[str], images=()):
        """(prompt_embeds (B, L, D) float32, mask (B, L) bool, image-slot mask (B, L) bool) as diffusers'
        `_get_qwen_prompt_embeds` makes them, every row right-padded to the longest. `images`: the condition
        images (uint8 RGBA or RGB, already resized), shared by every prompt."""
        te = self.text_encoder
        grids = []
        if images:
            if te.vision is None:
                raise ConfigError("the text encoder has no vision tower (model.visual.*): it cannot read images")
            for k, img in enumerate(images):
                try:
                    grids.append(vision_lib.image_grid(*img.shape[:2], te.vision.config))
                except ValueError as e:
                    # Only a processor whose pixel range excludes the ~output_resolution**2 inputs gets here (the
                    # published one takes 65,536 to 16.8M pixels); its second resize is not reproduced.
                    raise ConfigError(f"condition image {k + 1}, resized for the pipeline: {e}") from None
        tokens = prompts_lib.tokenize_prompts(self.tokenizer, prompts, [n for _, n in grids])
        ids, attn = tokens["input_ids"], tokens["attention_mask"]
        if not images:
            hidden = qwen3_vl.encode_features(te, ids, attn)
        else:
            rgb = [edit_images.over_white(img) for img in images]
            patches = [vision_lib.image_patches(x[None], te.vision.config, backend="pil") for x in rgb]
            hidden = qwen3_vl.encode_features_multi(te, ids, attn, patches, [g for g, _ in grids])
        return prompts_lib.extract_prompt_embeds(
            np.asarray(hidden, np.float32), ids, attn, tokens["drop_idx"], tokens["image_pad_id"]
        )


@functools.lru_cache(maxsize=16)
def _sampler(model: TransformerModel, sigmas: tuple, cfg_scale: float, use_kv_cache: bool, scheduler):
    """The jitted sampling loop for one schedule and guidance setting (compiled once per token layout)."""

    def run(params, noise, cond, neg, key):
        return sampling.euler_sample(
            model,
            params,
            noise,
            cond,
            np.asarray(sigmas, np.float32),
            neg_cond=neg,
            cfg_scale=cfg_scale,
            use_kv_cache=use_kv_cache,
            scheduler=scheduler,
            key=key,
        )

    return jax.jit(run)


# --- loading helpers ------------------------------------------------------------------------------------------------


def _model_index(path: Path) -> dict:
    file = path / MODEL_INDEX
    index = read_json_object(file, missing=f"{path} has no {MODEL_INDEX}: not a diffusers pipeline folder")
    name = index.get("_class_name")
    if name is not None and name != PIPELINE_CLASS:
        raise ConfigError(f"{file}: the pipeline is a {name}, not a {PIPELINE_CLASS}")
    return index


def load_pipeline_transformer(path: Path, dtype: str, mesh=None, rules=()) -> TransformerModel:
    """A pipeline's `transformer/`: a converted checkpoint (config.json + params/) is restored as is; a diffusers
    one is read leaf by leaf through the converter's plan (each leaf assembled on the host, then placed)."""
    if (path / checkpoint_io.PARAMS_DIR).is_dir():
        return load_transformer(path, mesh=mesh, rules=rules, dtype=dtype, param_dtype=dtype)
    try:
        config = convert.load_source_config(path).replace(dtype=dtype, param_dtype=dtype)
        np_dtype = np.dtype(jnp.bfloat16) if dtype == "bfloat16" else np.dtype(np.float32)
        leaves = {}
        with SafetensorsCheckpoint(path) as ckpt:
            convert.check_checkpoint(ckpt, config)
            for leaf_path, shape, sources in convert.plan(config):
                leaf = np.empty(shape, np_dtype)
                for key, spec in sources:
                    tensor = ckpt.read(key)
                    target = leaf if spec.layer is None else leaf[spec.layer]
                    target[...] = tensor.T if spec.transpose else tensor
                leaves[leaf_path] = jnp.asarray(leaf) if mesh is None else leaf
    except CheckpointError as e:
        raise ConfigError(f"{path}: {' '.join(str(e).split())}") from None
    return from_params(config, hf_keys.unflatten(leaves), mesh=mesh, rules=rules)


def _load_text_encoder(path: Path, dtype: str, mesh, rules) -> qwen3_vl.Qwen3VLParams:
    te = qwen3_vl.load_qwen3_vl(path / "text_encoder", dtype, mesh, rules)
    if te.vision is None:
        return te
    # transformers 5 saves the processor as processor/processor_config.json with the image processor's settings
    # nested; the vision tower reads them from preprocessor_config.json when there is one.
    if any((p / vision_lib.PREPROCESSOR_FILE).is_file() for p in (path / "text_encoder", path / "processor")):
        return te
    nested = path / "processor" / "processor_config.json"
    if nested.is_file():
        try:
            image_processor = json.loads(nested.read_text()).get("image_processor")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            raise ConfigError(f"{nested}: cannot read: {' '.join(str(e).split())}") from None
        if isinstance(image_processor, dict):
            hf_config, _ = read_config_json(path / "text_encoder", "Qwen3-VL checkpoint")
            config = vision_lib.vision_config_from_hf(hf_config, image_processor)
            te = qwen3_vl.Qwen3VLParams(te.text, dataclasses.replace(te.vision, config=config))
    return te


def _load_tokenizer(path: Path):
    import transformers

    for sub in ("processor", "tokenizer", "text_encoder"):
        folder = path / sub
        if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
            try:
                return transformers.AutoTokenizer.from_pretrained(str(folder))
            except (OSError, ValueError) as e:
                raise ConfigError(f"{folder}: cannot load the tokenizer: {' '.join(str(e).split())}") from None
    raise ConfigError(f"pipeline folder {path} has no tokenizer (processor/ or tokenizer/ with tokenizer.json)")


# --- input helpers --------------------------------------------------------------------------------------------------


def _prompt_list(prompt, name: str) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise ValueError(f"{name} must be a string or a non-empty list of strings, got {type(prompt).__name__}")


def _condition_images(image) -> list[np.ndarray]:
    """diffusers' `image`: one PIL image / uint8 array or a flat list of them -> uint8 (H, W, 3 or 4) arrays."""
    if image is None:
        return []
    images = image if isinstance(image, list) else [image]
    out = []
    for img in images:
        if isinstance(img, (list, tuple)):
            raise ValueError("image is one flat set of condition images shared by every prompt; it cannot be nested")
        if hasattr(img, "convert"):  # PIL
            img = np.asarray(img.convert("RGBA") if img.mode not in ("RGB", "RGBA") else img)
        img = np.asarray(img)
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] not in (3, 4):
            raise ValueError(f"a condition image must be uint8 (H, W, 3 or 4), got {img.dtype} {img.shape}")
        out.append(img)
    return out
