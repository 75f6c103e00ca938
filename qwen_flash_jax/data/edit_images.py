"""An edit's condition images and output size as Qwen-Image 2.1's pipeline makes them, for sampling
(`qwen_flash_jax.Pipeline`) and training (the input pipeline) alike.

`QwenImage21Pipeline` resizes every condition image (Lanczos, RGBA) to about `resolution`**2 pixels at the image's
own aspect ratio, sides rounded to multiples of 32, and gives the output the LAST condition image's aspect ratio at
the same pixel count. The VAE reads the RGBA image; the vision tower reads it composited over white.

Training examples are fitted (centre crop to the aspect ratio, then the same resize) to condition sizes this
sizing leaves unchanged, so the pipeline given a training example's images lays them out exactly as training did.
"""

from __future__ import annotations

import math

import numpy as np

SIZE_MULTIPLE = 32  # diffusers floors sizes to vae_scale_factor * 2 = 32 pixels


def dimensions(resolution: int, ratio: float) -> tuple[int, int]:
    """(width, height) of about resolution**2 pixels at aspect `ratio` = width / height, multiples of 32."""
    width = math.sqrt(resolution * resolution * ratio)
    height = width / ratio
    return round(width / SIZE_MULTIPLE) * SIZE_MULTIPLE, round(height / SIZE_MULTIPLE) * SIZE_MULTIPLE


def condition_size(resolution: int, height: int, width: int) -> tuple[int, int]:
    """(height, width) the pipeline resizes a height x width condition image to."""
    w, h = dimensions(resolution, width / height)
    return h, w


def output_size(resolution: int, condition_sizes) -> tuple[int, int]:
    """(height, width) of the output: the last condition image's aspect ratio at about resolution**2 pixels."""
    height, width = condition_sizes[-1]
    w, h = dimensions(resolution, width / height)
    return h // SIZE_MULTIPLE * SIZE_MULTIPLE, w // SIZE_MULTIPLE * SIZE_MULTIPLE


def rgba(img: np.ndarray) -> np.ndarray:
    if img.shape[-1] == 4:
        return img
    return np.concatenate([img, np.full(img.shape[:-1] + (1,), 255, np.uint8)], axis=-1)


def resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """Lanczos resize of the RGBA image, as diffusers' VaeImageProcessor.resize does it (PIL); RGBA out."""
    from PIL import Image

    pil = Image.fromarray(rgba(img), "RGBA")
    return np.asarray(pil.resize((width, height), resample=Image.LANCZOS))


def over_white(img: np.ndarray) -> np.ndarray:
    """RGB for the vision tower: RGBA composited over white, as the pipeline pastes it with PIL."""
    from PIL import Image

    image = Image.fromarray(rgba(img), "RGBA")
    white = Image.new("RGB", image.size, (255, 255, 255))
    white.paste(image, mask=image.getchannel("A"))
    return np.asarray(white)


def fit(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 RGB (height, width, 3): the image centre-cropped to the aspect ratio height:width, then resized with
    Lanczos (a training example's image made one of its layout's sizes; unchanged when it is that size already)."""
    from PIL import Image

    img = np.asarray(img)
    h, w = img.shape[:2]
    if (h, w) == (height, width):
        return img
    if h * width > w * height:  # too tall: crop rows
        keep = max(1, round(w * height / width))
        img = img[(h - keep) // 2 : (h - keep) // 2 + keep]
    elif h * width < w * height:  # too wide: crop columns
        keep = max(1, round(h * width / height))
        img = img[:, (w - keep) // 2 : (w - keep) // 2 + keep]
    resized = Image.fromarray(np.ascontiguousarray(img[..., :3])).resize((width, height), resample=Image.LANCZOS)
    return np.asarray(resized, np.uint8)


def pack_condition_latents(codec, images) -> np.ndarray:
    """(B, sum of h_k*w_k, C) float32: each condition image's packed latents, in order, `images` one
    (B, H_k, W_k, 3 or 4) batch per condition image (the transformer's prefix before the target)."""
    return np.concatenate([np.asarray(codec.pack(codec.encode(x)), np.float32) for x in images], axis=1)
