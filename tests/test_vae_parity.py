"""Parity of the Flax Qwen-Image 2.x VAE with diffusers' AutoencoderKLQwenImage21 on tiny random configs, and the
loader's error reporting."""

import json
import os
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import jax.numpy as jnp  # noqa: E402

from qwen_flash_jax.models import vae as vae_lib  # noqa: E402
from qwen_flash_jax.models import vae_io  # noqa: E402
from qwen_flash_jax.models.config import ConfigError  # noqa: E402

pytestmark = pytest.mark.parity

F32_TOLERANCE = 1e-4  # max abs error relative to the reference output's max magnitude
# bf16 params and activations against the float32 reference, measured on the "residual" config with 3 input seeds:
# encoder mean max error 1.3..1.5e-2 of its scale, decoded images 4.1..4.4e-2 (RMS errors <= 1.4e-2 of the RMS).
# diffusers' own model cast to bf16 is as far off (1.2..1.7e-2 and 4.0..4.9e-2); "plain_patch2": <= 1.6e-2 / 7.0e-2.
BF16_MAX_TOLERANCE = 1e-1
BF16_RMS_TOLERANCE = 3e-2

STATS = dict(latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 2.0, 0.5, 1.0])
CONFIGS = {
    # The published architecture (is_residual, RGBA in and out, no patching), shrunk: 3 downsamplings, temporal
    # shortcuts on two of them (the zero-frame average / last-frame duplication paths) and not on the third, and a
    # decoder base width unlike the encoder's. The temporal decoder stages narrow the width (repeat factor 4 < 8),
    # so which frame `DupUp3D` keeps matters, as in the published model's third stage.
    "residual": dict(
        base_dim=8,
        decoder_base_dim=12,
        z_dim=4,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        temperal_downsample=[True, True, False],
        scale_factor_spatial=8,
        **STATS,
    ),
    # Wan-2.1-style plain stages (no shortcuts, width-halving upsamplers) with 2x2 patching of the image.
    "plain_patch2": dict(
        base_dim=8,
        decoder_base_dim=None,
        z_dim=4,
        dim_mult=[1, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[True, False],
        is_residual=False,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        scale_factor_spatial=8,
        **STATS,
    ),
}
SIZE = 32  # pixels; 8x compression in both configs -> 4x4 latents


def random_reference(config: dict, seed: int = 0):
    """A diffusers VAE with every parameter random: fan-in-scaled conv weights, biases ~0.1, norm gains ~1 +- 0.2
    (random gains catch a misplaced gain; the scaling keeps most decoded pixels inside the [-1, 1] clamp)."""
    from diffusers import AutoencoderKLQwenImage21

    torch.manual_seed(seed)
    model = AutoencoderKLQwenImage21(**config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gamma"):
                param.copy_(1 + 0.2 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
            else:
                param.copy_(torch.randn_like(param) / param[0].numel() ** 0.5)
    return model


def _to_torch(x):  # NHWC -> (B, C, 1, H, W)
    return torch.tensor(np.asarray(x, np.float32)).permute(0, 3, 1, 2)[:, :, None]


def _from_torch(t):  # (B, C, 1, H, W) -> NHWC
    return t[:, :, 0].permute(0, 2, 3, 1).float().numpy()


def _rel_err(ours, ref):
    return float(np.max(np.abs(np.asarray(ours, np.float32) - ref)) / np.max(np.abs(ref)))


def _inputs(config: vae_lib.VAEConfig, seed: int):
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, (2, SIZE, SIZE, config.image_channels)).astype(np.float32)
    h = SIZE // config.spatial_compression
    latents = rng.standard_normal((2, h, h, config.z_dim)).astype(np.float32)
    return images, latents


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (diffusers model, its save_pretrained directory); "residual" is saved in several shards."""
    out = {}
    for name, config in CONFIGS.items():
        reference = random_reference(config)
        path = tmp_path_factory.mktemp(f"vae_{name}")
        reference.save_pretrained(path, **({"max_shard_size": "50KB"} if name == "residual" else {}))
        out[name] = (reference, path)
    assert (out["residual"][1] / "diffusion_pytorch_model.safetensors.index.json").is_file()
    return out


@pytest.fixture(scope="module")
def loaded(saved):
    return {name: vae_io.load_vae(path) for name, (_, path) in saved.items()}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_float32_encode_matches_diffusers(saved, loaded, name):
    reference, ours = saved[name][0], loaded[name]
    images, _ = _inputs(ours.config, 1)
    with torch.no_grad():
        dist = reference.encode(_to_torch(images)).latent_dist
    mean, logvar = ours.encode(images)
    assert mean.shape == logvar.shape == (2, 4, 4, 4)
    assert _rel_err(mean, _from_torch(dist.mean)) <= F32_TOLERANCE
    assert _rel_err(logvar, _from_torch(dist.logvar)) <= F32_TOLERANCE


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_float32_decode_matches_diffusers(saved, loaded, name):
    reference, ours = saved[name][0], loaded[name]
    _, latents = _inputs(ours.config, 2)
    with torch.no_grad():
        expected = _from_torch(reference.decode(_to_torch(latents)).sample)
    out = np.asarray(ours.decode(latents))
    assert out.shape == expected.shape == (2, SIZE, SIZE, 4)
    assert np.abs(out).max() <= 1.0
    assert np.mean(np.abs(expected) >= 1.0) < 0.3  # the comparison is not decided by the clamp
    assert _rel_err(out, expected) <= F32_TOLERANCE


def test_bfloat16_within_measured_tolerance(saved):
    reference, path = saved["residual"]
    ours = vae_io.load_vae(path, dtype="bfloat16", param_dtype="bfloat16")
    images, latents = _inputs(ours.config, 3)
    with torch.no_grad():
        ref_mean = _from_torch(reference.encode(_to_torch(images)).latent_dist.mean)
        ref_images = _from_torch(reference.decode(_to_torch(latents)).sample)
    mean, out = ours.encode(images)[0], ours.decode(latents)
    assert mean.dtype == out.dtype == jnp.bfloat16
    for got, want in ((mean, ref_mean), (out, ref_images)):
        got = np.asarray(got, np.float32)
        assert _rel_err(got, want) <= BF16_MAX_TOLERANCE
        assert np.sqrt(np.mean((got - want) ** 2) / np.mean(want**2)) <= BF16_RMS_TOLERANCE


def test_pipeline_latent_transforms_match_diffusers(saved, loaded):
    """`VAECodec` = the pipeline's VAE path: condition images -> normalised, packed latents
    (`_encode_vae_image` + `_pack_latents`), and tokens -> images (`_unpack_latents`, de-normalise, decode)."""
    from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import QwenImage21Pipeline

    reference, ours = saved["residual"][0], loaded["residual"]
    codec = vae_io.VAECodec(ours, rgb=False)
    z, s = ours.config.z_dim, codec.scale_factor
    assert codec.latent_shape(SIZE, SIZE) == (4, 4, z)

    # Encode: an RGB uint8 image; the pipeline converts it to RGBA (opaque alpha) and scales to [-1, 1].
    rgb = np.random.default_rng(4).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, np.full((2, SIZE, SIZE, 1), 255, np.uint8)], axis=-1).astype(np.float32)
    pipeline_self = types.SimpleNamespace(vae=reference, latent_channels=z)
    with torch.no_grad():
        encoded = QwenImage21Pipeline._encode_vae_image(pipeline_self, _to_torch(rgba / 255 * 2 - 1), None)
    expected_tokens = QwenImage21Pipeline._pack_latents(encoded, 2, z, 4, 4).numpy()
    latents = codec.encode(rgb)
    tokens = codec.pack(latents)
    assert tokens.shape == expected_tokens.shape
    assert _rel_err(tokens, expected_tokens) <= F32_TOLERANCE
    np.testing.assert_allclose(
        vae_lib.denormalize_latents(latents, ours.config), ours.encode(rgba / 127.5 - 1)[0], rtol=1e-5, atol=1e-5
    )

    # Decode: the end of the pipeline's __call__.
    tokens = np.random.default_rng(5).standard_normal((2, 16, z)).astype(np.float32)
    with torch.no_grad():
        x = QwenImage21Pipeline._unpack_latents(torch.tensor(tokens), SIZE, SIZE, s)
        x = x * torch.tensor(STATS["latents_std"]).view(1, z, 1, 1, 1) + torch.tensor(STATS["latents_mean"]).view(
            1, z, 1, 1, 1
        )
        expected = _from_torch(reference.decode(x).sample)
    images = codec.decode(codec.unpack(tokens, 4, 4))
    assert _rel_err(images, expected) <= F32_TOLERANCE
    assert vae_io.VAECodec(ours).decode(codec.unpack(tokens, 4, 4)).shape[-1] == 3  # rgb=True drops alpha


@pytest.mark.sharded
def test_config_and_parameter_tree_match_diffusers(saved):
    """Config fields map one to one; every parameter has logical axes, its diffusers key and shape; the module
    splits in tree mode (no shared state)."""
    import jax
    from flax import nnx
    from jax.sharding import PartitionSpec

    from qwen_flash_jax import sharding

    reference, path = saved["residual"]
    config = vae_io.read_vae_config(path)
    assert config == vae_lib.VAEConfig(**CONFIGS["residual"])
    assert (config.spatial_compression, config.image_channels) == (8, 4)
    assert vae_lib.VAEConfig(**CONFIGS["plain_patch2"]).spatial_compression == 8

    paths, shapes = vae_io.expected_tensors(config)
    state_dict = reference.state_dict()
    assert shapes == {k: tuple(v.shape) for k, v in state_dict.items()}
    assert sorted(set(shapes) - set(paths)) == sorted(k for k in state_dict if ".time_conv." in k)

    module = nnx.eval_shape(lambda: vae_lib.QwenImageVAE(config, rngs=nnx.Rngs(0)))  # eager init: 1 compile per shape
    _, state = nnx.split(module, graph=False)
    for _, variable in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        names = variable.get_metadata().get("out_sharding")
        assert names is not None and len(names) == len(variable.shape)
    mesh = sharding.make_mesh([("tensor", 2)], devices=jax.devices()[:2])
    shardings = sharding.param_shardings(state, mesh, (("vae_out", "tensor"),))
    assert shardings["decoder"]["conv_in"]["kernel"].spec == PartitionSpec(None, None, None, "tensor")


def test_encode_rejects_sizes_the_model_cannot_take(loaded):
    ours = loaded["residual"]
    with pytest.raises(ValueError, match="multiple of 8"):
        ours.encode(np.zeros((1, 36, 32, 4), np.float32))
    with pytest.raises(ValueError, match=r"\(B, H, W, 4\)"):
        ours.encode(np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(ConfigError, match="is_residual=False"):
        vae_lib.VAEConfig(**(CONFIGS["plain_patch2"] | {"attn_scales": [1.0]}))


def _write_variant(saved, tmp_path, mutate):
    """A single-file copy of the "residual" checkpoint with `mutate(state_dict)` applied."""
    from safetensors.numpy import save_file

    reference, path = saved["residual"]
    state = {k: v.detach().numpy().copy() for k, v in reference.state_dict().items()}
    mutate(state)
    out = tmp_path / "variant"
    out.mkdir()
    (out / "config.json").write_text((path / "config.json").read_text())
    save_file(state, str(out / "diffusion_pytorch_model.safetensors"))
    return out


MUTATIONS = {
    "missing": (lambda s: s.pop("decoder.conv_out.bias"), r"missing 1 of \d+ tensors: decoder.conv_out.bias"),
    "missing_skipped_time_conv": (
        lambda s: s.pop("decoder.up_blocks.1.upsampler.time_conv.weight"),
        "missing 1 of .*decoder.up_blocks.1.upsampler.time_conv.weight",
    ),
    "unexpected": (
        lambda s: s.update({"encoder.extra.weight": np.zeros(3, np.float32)}),
        "1 unexpected tensors: encoder.extra.weight",
    ),
    "wrong_shape": (
        lambda s: s.update({"encoder.conv_in.weight": np.zeros((8, 4, 3, 1), np.float32)}),
        r"diffusion_pytorch_model.safetensors: tensor encoder.conv_in.weight has shape \(8, 4, 3, 1\), "
        r"expected \(8, 4, 3, 3\)",
    ),
}


@pytest.mark.parametrize("case", sorted(MUTATIONS))
def test_bad_checkpoint_is_one_clear_config_error(saved, tmp_path, case):
    mutate, message = MUTATIONS[case]
    with pytest.raises(ConfigError, match=message) as info:
        vae_io.load_vae(_write_variant(saved, tmp_path, mutate))
    assert "\n" not in str(info.value)


def test_truncated_file_is_one_clear_config_error(saved, tmp_path):
    path = _write_variant(saved, tmp_path, lambda s: None)
    weights = path / "diffusion_pytorch_model.safetensors"
    os.truncate(weights, weights.stat().st_size - 100)
    with pytest.raises(ConfigError, match="diffusion_pytorch_model.safetensors: not a valid safetensors file") as info:
        vae_io.load_vae(path)
    assert "\n" not in str(info.value)


def test_bad_directory_is_one_clear_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        vae_io.load_vae(tmp_path / "absent")
    with pytest.raises(ConfigError, match="has no config.json"):
        vae_io.load_vae(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan", "base_dim": 96}))
    with pytest.raises(ConfigError, match="describes a AutoencoderKLWan"):
        vae_io.load_vae(tmp_path)
    config = {"_class_name": vae_lib.DIFFUSERS_CLASS_NAME, **CONFIGS["residual"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"no \*.safetensors files") as info:
        vae_io.load_vae(tmp_path)
    assert "\n" not in str(info.value)
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "latents_std"}))
    with pytest.raises(ConfigError, match="no latents_std"):
        vae_io.load_vae(tmp_path)
