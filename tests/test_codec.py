"""The toy space-to-depth latent codec: lossless, shapes, packing, and clear errors on bad sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_flash_jax.models.codec import CodecConfig, SpaceToDepthCodec


def _images(b=2, h=32, w=48, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (b, h, w, 3), dtype=np.uint8)


def test_shapes_and_layout():
    codec = SpaceToDepthCodec(patch=4)
    assert codec.channels == 48 and codec.scale_factor == 4
    assert codec.latent_shape(32, 32) == (8, 8, 48)
    assert codec.latent_shape(32, 48) == (8, 12, 48)
    images = _images()
    latents = codec.encode(images)
    assert latents.shape == (2, 8, 12, 48) and latents.dtype == np.float32
    # Token (i, j) holds the pixels of tile (i, j) in (row, column, colour) order.
    x = images.astype(np.float32) / 127.5 - 1
    np.testing.assert_array_equal(latents[1, 2, 5], x[1, 8:12, 20:24].reshape(-1))
    assert SpaceToDepthCodec(patch=2).latent_shape(8, 4) == (4, 2, 12)


def test_lossless_round_trip():
    codec = SpaceToDepthCodec()
    images = _images()
    floats = codec.decode(codec.encode(images))
    assert floats.shape == images.shape and floats.dtype == np.float32
    assert floats.min() >= -1 and floats.max() <= 1
    np.testing.assert_array_equal(codec.to_uint8(floats), images)
    x = np.random.default_rng(1).uniform(-1, 1, (3, 16, 24, 3)).astype(np.float32)
    np.testing.assert_array_equal(codec.decode(codec.encode(x)), x)  # exact: a pure permutation


def test_normalised_codec_round_trip():
    images = _images(b=4)
    codec = SpaceToDepthCodec().with_stats(images)
    latents = codec.encode(images)
    flat = latents.reshape(-1, codec.channels)
    np.testing.assert_allclose(flat.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(flat.std(axis=0), 1, atol=1e-3)
    np.testing.assert_array_equal(codec.to_uint8(codec.decode(latents)), images)
    np.testing.assert_allclose(codec.decode(latents), images / 127.5 - 1, atol=1e-6)


def test_pack_unpack_inverse_and_row_major():
    codec = SpaceToDepthCodec()
    latents = codec.encode(_images())
    tokens = codec.pack(latents)
    assert tokens.shape == (2, 8 * 12, 48)
    np.testing.assert_array_equal(tokens[:, 2 * 12 + 5], latents[:, 2, 5])  # row-major
    np.testing.assert_array_equal(codec.unpack(tokens, 8, 12), latents)
    with pytest.raises(ValueError, match="h\\*w"):
        codec.unpack(tokens, 8, 8)


def test_jax_arrays_and_jit():
    codec = SpaceToDepthCodec()
    images = _images()
    latents = jax.jit(codec.encode)(jnp.asarray(images))
    assert isinstance(latents, jax.Array)
    # XLA may turn the division by 127.5 into a multiplication: equal to numpy's within one float32 ulp.
    np.testing.assert_allclose(np.asarray(latents), codec.encode(images), rtol=0, atol=2e-7)
    back = jax.jit(lambda z: codec.to_uint8(codec.decode(codec.unpack(codec.pack(z), 8, 12))))(latents)
    np.testing.assert_array_equal(np.asarray(back), images)


def test_bad_sizes_raise_clear_errors():
    codec = SpaceToDepthCodec(patch=4)
    with pytest.raises(ValueError, match="multiple of the patch size 4"):
        codec.latent_shape(30, 32)
    with pytest.raises(ValueError, match="must be even"):
        codec.latent_shape(36, 32)  # 9 x 8 tokens: not whole 2x2 slots
    with pytest.raises(ValueError, match="multiple of the patch size"):
        codec.encode(np.zeros((1, 30, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="must be even"):
        codec.encode(np.zeros((1, 36, 32, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        codec.encode(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8 or float"):
        codec.encode(np.zeros((1, 32, 32, 3), np.int32))
    with pytest.raises(ValueError, match="48"):
        codec.decode(np.zeros((1, 8, 8, 12), np.float32))
    with pytest.raises(ValueError, match="entries"):
        CodecConfig(mean=(0.0,) * 3, std=(1.0,) * 3)
    with pytest.raises(ValueError, match="both"):
        CodecConfig(mean=(0.0,) * 48)
