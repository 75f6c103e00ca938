"""Streaming converter, safetensors checkpoint reader and converted-checkpoint reader, on a tiny random diffusers
model."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from qwen_flash_jax import checkpoint_io, config_lib, convert
from qwen_flash_jax.diffusion.scheduler import MODEL_INDEX, SCHEDULER_CONFIG, FlowMatchScheduler
from qwen_flash_jax.errors import CheckpointError
from qwen_flash_jax.models import hf_keys
from qwen_flash_jax.models.config import ConfigError, TransformerConfig
from qwen_flash_jax.safetensors_checkpoint import INDEX_FILES, SafetensorsCheckpoint
from qwen_flash_jax.train import teacher
from tests import qwen_image_folder
from tests.torch_reference import TINY

pytestmark = pytest.mark.parity  # converts a random diffusers checkpoint

REPO = Path(__file__).resolve().parents[1]
INDEX_FILE = INDEX_FILES[0]  # diffusers' shard index


@pytest.fixture(scope="module")
def diffusers_model(tmp_path_factory):
    """(dir written by `save_pretrained` in several shards, its state dict as numpy, its config)."""
    import torch
    from diffusers import QwenImage21Transformer2DModel

    torch.manual_seed(0)
    model = QwenImage21Transformer2DModel(**TINY)
    with torch.no_grad():
        for p in model.parameters():  # norms too: ones would hide a scale/transposition mix-up
            torch.nn.init.normal_(p)
    path = tmp_path_factory.mktemp("diffusers") / "transformer"
    model.save_pretrained(path, max_shard_size="40KB")
    assert len(list(path.glob("*.safetensors"))) > 2 and (path / INDEX_FILE).is_file()
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    config = TransformerConfig.from_diffusers_config(dict(model.config))
    return path, state, config


def write_checkpoint(path: Path, tensors: dict[str, np.ndarray], config: dict | None = None, shards: int = 3):
    """A diffusers-style directory: config.json, `shards` safetensors files and their index."""
    path.mkdir(parents=True)
    config = config if config is not None else {"_class_name": "QwenImage21Transformer2DModel", **TINY}
    (path / "config.json").write_text(json.dumps(config))
    keys = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: np.ascontiguousarray(tensors[k]) for k in keys[i::shards]}
        save_file(part, path / name)
        weight_map.update(dict.fromkeys(part, name))
    (path / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def leaves(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def assert_trees_equal(got, want, dtype):
    got, want = leaves(got), leaves(want)
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == dtype, key
        assert got[key].shape == want[key].shape, key
        np.testing.assert_array_equal(got[key], want[key].astype(dtype), err_msg=key)


def run_main(argv, capsys) -> tuple[int, str]:
    try:
        convert.main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def no_leftovers(dst: Path) -> bool:
    return not dst.exists() and not list(dst.parent.glob(f".{dst.name}.tmp-*"))


# --- successful conversions ----------------------------------------------------------------------------------------


def test_convert_float32_is_exact(diffusers_model, tmp_path):
    src, state, config = diffusers_model
    dst = tmp_path / "out"
    got_config = convert.convert(src, dst, dtype="float32", progress=False)

    assert got_config == config.replace(param_dtype="float32") == checkpoint_io.read_config(dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # temporary directory renamed away
    restored = checkpoint_io.restore_params(dst)
    assert_trees_equal(restored, hf_keys.state_dict_to_params(state, config), np.float32)
    shapes = {
        jax.tree_util.keystr(tuple(jax.tree_util.DictKey(k) for k in path)): s
        for path, s in hf_keys.param_shapes(config).items()
    }
    assert {k: v.shape for k, v in leaves(restored).items()} == shapes


@pytest.mark.sharded
def test_convert_bfloat16_cli_and_sharded_restore(diffusers_model, tmp_path, capsys):
    src, state, config = diffusers_model
    dst = tmp_path / "out"
    code, err = run_main(["--src", src, "--dst", dst, "--dtype", "bfloat16"], capsys)
    assert code == 0, err
    n = len(hf_keys.param_shapes(config))
    assert sum(f"/{n}]" in line for line in err.splitlines()) == n  # one progress line per output leaf
    assert checkpoint_io.read_config(dst).param_dtype == "bfloat16"

    want = hf_keys.state_dict_to_params(state, config, dtype=ml_dtypes.bfloat16)
    assert_trees_equal(checkpoint_io.restore_params(dst), want, ml_dtypes.bfloat16)

    # Restore straight into shardings and another dtype, as a model would: kernels split on their output axis
    # over 2 devices, the rest replicated.
    mesh = jax.make_mesh((2,), ("model",), devices=jax.devices()[:2])
    P = jax.sharding.PartitionSpec

    def abstract(path, x):
        spec = P(*[None] * (x.ndim - 1), "model") if path[-1].key == "kernel" else P()
        return jax.ShapeDtypeStruct(x.shape, np.float32, sharding=jax.sharding.NamedSharding(mesh, spec))

    target = jax.tree_util.tree_map_with_path(abstract, want)
    restored = checkpoint_io.restore_params(dst, target)
    shardings = jax.tree.map(lambda x: x.sharding, target)
    assert jax.tree.map(lambda x: x.sharding, restored) == shardings
    assert_trees_equal(restored, jax.tree.map(lambda x: x.astype(np.float32), want), np.float32)
    # A target leaf without sharding goes to the default device.
    plain = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), want)
    assert_trees_equal(checkpoint_io.restore_params(dst, plain), want, ml_dtypes.bfloat16)


def test_the_pipelines_scheduler_goes_with_the_converted_transformer(diffusers_model, tmp_path, capsys):
    """A transformer converted from inside a pipeline folder carries that pipeline's scheduler config, byte for byte,
    so a job whose teacher it is samples on the pipeline's schedule; one outside a pipeline folder carries none; a
    scheduler this project cannot sample on is one error line before anything is written."""
    src = diffusers_model[0]
    pipeline = tmp_path / "pipeline"
    shutil.copytree(src, pipeline / "transformer")
    (pipeline / "scheduler").mkdir()
    (pipeline / SCHEDULER_CONFIG).write_text(json.dumps(qwen_image_folder.SCHEDULER, indent=1))
    convert.convert(pipeline / "transformer", tmp_path / "out", dtype="float32", progress=False)
    assert (tmp_path / "out" / SCHEDULER_CONFIG).read_bytes() == (pipeline / SCHEDULER_CONFIG).read_bytes()
    assert FlowMatchScheduler.from_pretrained(tmp_path / "out") == FlowMatchScheduler.from_pretrained(pipeline)
    convert.convert(src, tmp_path / "alone", dtype="float32", progress=False)
    assert sorted(p.name for p in (tmp_path / "alone").iterdir()) == ["config.json", "params"]

    # A distilled pipeline's fixed grid (model_index.json's sample_sigmas, as 2.1 Turbo ships) goes with it, and a
    # job refuses that checkpoint as a teacher instead of sampling it on another grid.
    grid = [1.0, 0.9, 0.7, 0.4]
    (pipeline / MODEL_INDEX).write_text(json.dumps({"_class_name": "QwenImage21Pipeline", "sample_sigmas": grid}))
    convert.convert(pipeline / "transformer", tmp_path / "turbo", dtype="float32", progress=False)
    assert FlowMatchScheduler.from_pretrained(tmp_path / "turbo").sample_sigmas == tuple(grid)
    config = config_lib.load_config("configs/5to5.py")
    config.teachers.base.path = str(tmp_path / "turbo")
    with pytest.raises(ConfigError, match="fixes sample_sigmas \\(4 steps\\)"):
        teacher.target_scheduler(config)

    (pipeline / SCHEDULER_CONFIG).write_text(json.dumps({**qwen_image_folder.SCHEDULER, "use_karras_sigmas": True}))
    code, err = run_main(["--src", pipeline / "transformer", "--dst", tmp_path / "bad", "--quiet"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: ") and "scheduler_config.json" in err and "use_karras_sigmas" in err, err
    assert no_leftovers(tmp_path / "bad")


def test_convert_single_bf16_file_to_float32(diffusers_model, tmp_path):
    """No index, one file, BF16 source: the reader's bf16 path and an exact upcast."""
    import torch
    from safetensors.torch import save_file as torch_save_file

    src_dir, state, config = diffusers_model
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(src_dir / "config.json", src / "config.json")
    bf16 = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in state.items()}
    torch_save_file(bf16, src / "diffusion_pytorch_model.safetensors")
    convert.convert(src, tmp_path / "out", dtype="float32", progress=False)
    want = hf_keys.state_dict_to_params({k: v.float().numpy() for k, v in bf16.items()}, config)
    assert_trees_equal(checkpoint_io.restore_params(tmp_path / "out"), want, np.float32)


def test_interrupt_leaves_nothing(diffusers_model, tmp_path, monkeypatch):
    src, _, _ = diffusers_model
    dst = tmp_path / "out"
    calls = []
    real_read = SafetensorsCheckpoint.read

    def read(self, key):  # interrupt after several leaves were already saved
        calls.append(key)
        if len(calls) == 15:
            raise KeyboardInterrupt
        return real_read(self, key)

    monkeypatch.setattr(SafetensorsCheckpoint, "read", read)
    with pytest.raises(KeyboardInterrupt):
        convert.convert(src, dst, dtype="float32", progress=False)
    assert no_leftovers(dst) and list(tmp_path.iterdir()) == []


# --- bad inputs: exit status 2, one line, nothing written ----------------------------------------------------------


def _drop_key(state, path):
    del state["transformer_blocks.1.attn.to_k.weight"]
    write_checkpoint(path, state)
    return "transformer_blocks.1.attn.to_k.weight"


def _extra_key(state, path):
    state["transformer_blocks.1.attn.to_k.bias"] = np.zeros(32, np.float32)
    write_checkpoint(path, state)
    return "transformer_blocks.1.attn.to_k.bias"


def _wrong_shape(state, path):
    state["proj_out.weight"] = np.zeros((9, 32), np.float32)
    write_checkpoint(path, state)
    return "proj_out.weight"


def _other_model(state, path):
    write_checkpoint(path, state, config={"_class_name": "FluxTransformer2DModel", "num_layers": 2})
    return "FluxTransformer2DModel"


def _truncated(src_dir, path):
    shutil.copytree(src_dir, path)
    shard = sorted(path.glob("*.safetensors"))[-1]
    os.truncate(shard, shard.stat().st_size - 100)
    return "truncated"


def _bad_json_header(src_dir, path):
    shutil.copytree(src_dir, path)
    shard = sorted(path.glob("*.safetensors"))[0]
    with open(shard, "r+b") as f:
        f.seek(8)
        f.write(b"{nope")
    return "invalid JSON"


def _header_too_long(src_dir, path):
    shutil.copytree(src_dir, path)
    shard = sorted(path.glob("*.safetensors"))[0]
    with open(shard, "r+b") as f:
        f.write(struct.pack("<Q", 10**9))
    return "header too large"


def _no_config(src_dir, path):
    shutil.copytree(src_dir, path)
    (path / "config.json").unlink()
    return "config.json"


ON_STATE = {
    "missing_key": _drop_key,
    "unexpected_key": _extra_key,
    "shape_mismatch": _wrong_shape,
    "other_model_config": _other_model,
}
ON_FILES = {
    "truncated_shard": _truncated,
    "corrupt_header_json": _bad_json_header,
    "corrupt_header_length": _header_too_long,
    "no_config": _no_config,
}


@pytest.mark.parametrize("case", [*ON_STATE, *ON_FILES])
def test_bad_source(case, diffusers_model, tmp_path, capsys):
    src_dir, state, _ = diffusers_model
    src = tmp_path / "src"
    if case in ON_STATE:
        expected = ON_STATE[case](dict(state), src)
    else:
        expected = ON_FILES[case](src_dir, src)
    dst = tmp_path / "out"
    code, err = run_main(["--src", src, "--dst", dst, "--dtype", "float32"], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert expected in err
    assert no_leftovers(dst)


def test_existing_dst(diffusers_model, tmp_path, capsys):
    src, _, _ = diffusers_model
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    code, err = run_main(["--src", src, "--dst", dst], capsys)
    assert code == 2 and err.startswith("error: ") and "already exists" in err and len(err.splitlines()) == 1
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_bad_dtype(diffusers_model, tmp_path, capsys):
    code, err = run_main(["--src", diffusers_model[0], "--dst", tmp_path / "out", "--dtype", "int8"], capsys)
    assert code == 2 and err.startswith("error: ") and "int8" in err and len(err.splitlines()) == 1
    assert no_leftovers(tmp_path / "out")


def test_missing_src_subprocess(tmp_path):
    """The real entry point: no traceback, exit status 2, one line."""
    dst = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [sys.executable, "-m", "qwen_flash_jax.convert", "--src", str(tmp_path / "nope"), "--dst", str(dst)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "does not exist" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert no_leftovers(dst)


# --- safetensors checkpoint reader ---------------------------------------------------------------------------------


def write_raw(path: Path, header, data: bytes) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_reader_roundtrip_dtypes(tmp_path):
    import torch
    from safetensors.torch import save_file as torch_save_file

    arrays = {
        "f16": np.arange(6, dtype=np.float16).reshape(2, 3),
        "f32": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
        "f64": np.array([1.5, -2.25]),
        "empty": np.zeros((0, 3), np.float32),
    }
    tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
    tensors["bf16"] = torch.tensor([1.0, -3.5, 0.1], dtype=torch.bfloat16)
    torch_save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    with SafetensorsCheckpoint(tmp_path / "x.safetensors") as f:
        assert sorted(f.keys()) == sorted(tensors)
        assert f.tensors["bf16"].dtype == "BF16" and f.tensors["f32"].shape == (3, 4)
        assert f.tensors["f32"].file == tmp_path / "x.safetensors"
        for k, v in arrays.items():
            got = f.read(k)
            assert got.dtype == v.dtype and np.array_equal(got, v), k
        got = f.read("bf16")
        assert got.dtype == ml_dtypes.bfloat16  # bit for bit what torch wrote
        assert np.array_equal(got.view(np.uint16), tensors["bf16"].view(torch.int16).numpy().view(np.uint16))
        with pytest.raises(CheckpointError, match="checkpoint has no tensor 'nope'"):
            f.read("nope")


@pytest.mark.parametrize(
    "header, data, detail",
    [
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            bytes(12),
            "offset",
        ),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8), "offset"),
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8), ""),
        ({"a": {"dtype": "F32", "shape": [2]}}, bytes(8), "data_offsets"),
        ({"a": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 2]}}, bytes(2), "Q9"),
        ([1, 2], b"", "JSON"),
        (b"{nope", b"", "JSON"),
    ],
    ids=["overlap", "byte_count", "truncated", "incomplete_entry", "unknown_dtype", "not_object", "bad_json"],
)
def test_reader_rejects(tmp_path, header, data, detail):
    path = write_raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(CheckpointError, match="not a valid safetensors file") as info:
        SafetensorsCheckpoint(path)
    message = str(info.value)
    assert str(path) in message and detail in message and "\n" not in message


def test_reader_rejects_non_float_and_unreadable_files(tmp_path):
    save_file({"a": np.arange(2, dtype=np.int8)}, tmp_path / "int.safetensors")
    with pytest.raises(CheckpointError, match=r"int\.safetensors: tensor 'a' has unsupported dtype 'I8'"):
        SafetensorsCheckpoint(tmp_path / "int.safetensors")
    (tmp_path / "short.safetensors").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match=r"short\.safetensors: not a valid safetensors file"):
        SafetensorsCheckpoint(tmp_path / "short.safetensors")
    with pytest.raises(CheckpointError, match="no such file or directory"):
        SafetensorsCheckpoint(tmp_path / "absent.safetensors")
    # A file cut short after its header was read: the read, not the open, fails, with the same kind of line.
    path = tmp_path / "cut.safetensors"
    save_file({"w": np.arange(1000, dtype=np.float32)}, path)
    with SafetensorsCheckpoint(path) as ckpt:
        os.truncate(path, 2000)
        with pytest.raises(CheckpointError, match=r"cut\.safetensors: cannot read tensor 'w'") as info:
            ckpt.read("w")
    assert "\n" not in str(info.value)


def test_reader_key_in_two_shards(tmp_path):
    for name in ("a.safetensors", "b.safetensors"):
        save_file({"w": np.zeros(2, np.float32)}, tmp_path / name)
    with pytest.raises(CheckpointError, match="'w' is in two shards"):
        SafetensorsCheckpoint(tmp_path)
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": {"w": "a.safetensors", "v": "b.safetensors"}}))
    save_file({"v": np.zeros(2, np.float32), "w": np.zeros(2, np.float32)}, tmp_path / "b.safetensors")
    with pytest.raises(CheckpointError, match="two shards"):
        SafetensorsCheckpoint(tmp_path)


def test_reader_index_mismatch(tmp_path):
    save_file({"w": np.zeros(2, np.float32)}, tmp_path / "a.safetensors")
    save_file({"v": np.zeros(2, np.float32)}, tmp_path / "b.safetensors")
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": {"w": "b.safetensors", "v": "b.safetensors"}}))
    with pytest.raises(CheckpointError, match="'w' is not in its shard"):
        SafetensorsCheckpoint(tmp_path)
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": {"w": "missing.safetensors"}}))
    with pytest.raises(CheckpointError, match="does not exist"):
        SafetensorsCheckpoint(tmp_path)
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": {"w": "../a.safetensors"}}))
    with pytest.raises(CheckpointError, match="not a plain file name"):
        SafetensorsCheckpoint(tmp_path)


class _CountingShard:
    """A `safe_open` handle that records which tensors were read whole."""

    def __init__(self, shard, whole: list):
        self.shard, self.whole = shard, whole

    def get_tensor(self, name):
        self.whole.append(name)
        return self.shard.get_tensor(name)

    def get_slice(self, name):
        return self.shard.get_slice(name)

    def __exit__(self, *exc):
        return self.shard.__exit__(*exc)


@pytest.mark.sharded  # a mesh over several devices
def test_read_nested_sharded_reads_blocks_and_equals_the_whole_read(tmp_path):
    """With shardings, "copy" and "transpose" tensors are read block by block (never whole) and give exactly the
    arrays an unsharded read gives; a callable layout and a 0-size tensor are read whole."""
    import torch
    from safetensors.torch import save_file as torch_save_file

    rng = np.random.default_rng(0)
    source = {
        "w": rng.standard_normal((6, 4), np.float32),
        "b": rng.standard_normal(4, np.float32),
        "c": rng.standard_normal((4, 2, 3), np.float32),
        "e": np.zeros((0, 4), np.float32),
    }
    tensors = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in source.items()}
    torch_save_file(tensors, tmp_path / "m.safetensors")
    plan = {
        "w": (("lin", "kernel"), "transpose"),
        "b": (("lin", "bias"), "copy"),
        "c": (("conv",), lambda t: t.reshape(t.shape[0], -1).T),
        "e": (("empty",), "copy"),
    }
    mesh = jax.make_mesh((2,), ("model",), devices=jax.devices()[:2])
    P, Named = jax.sharding.PartitionSpec, jax.sharding.NamedSharding
    shardings = {
        "lin": {"kernel": Named(mesh, P(None, "model")), "bias": Named(mesh, P())},
        "conv": Named(mesh, P(None, "model")),
        "empty": Named(mesh, P(None, "model")),
    }
    with SafetensorsCheckpoint(tmp_path / "m.safetensors") as ckpt:
        whole = ckpt.read_nested(plan, np.float32)
        read_whole: list = []
        ckpt._shards = {f: _CountingShard(s, read_whole) for f, s in ckpt._shards.items()}
        sharded = ckpt.read_nested(plan, np.float32, shardings)
    assert sorted(read_whole) == ["c", "e"]
    assert jax.tree.map(lambda x: x.sharding, sharded) == shardings
    want = {
        "lin": {"kernel": source["w"].T, "bias": source["b"]},
        "conv": source["c"].reshape(4, -1).T,
        "empty": source["e"],
    }
    for name, want_leaf in [
        ("lin/kernel", want["lin"]["kernel"]),
        ("lin/bias", want["lin"]["bias"]),
        ("conv", want["conv"]),
        ("empty", want["empty"]),
    ]:
        path = name.split("/")
        got, got_whole = sharded, whole
        for part in path:
            got, got_whole = got[part], got_whole[part]
        expected = want_leaf.astype(ml_dtypes.bfloat16).astype(np.float32)
        assert got.dtype == np.float32 and got_whole.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(got), expected, err_msg=name)
        np.testing.assert_array_equal(np.asarray(got_whole), expected, err_msg=name)
        for shard in got.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), expected[shard.index], err_msg=name)


# --- converted-checkpoint reader -----------------------------------------------------------------------------------


def test_restore_rejects_non_checkpoints(diffusers_model, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint_io.restore_params(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        checkpoint_io.read_config(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no params"):
        checkpoint_io.restore_params(tmp_path)
    with pytest.raises(CheckpointError, match="no params"):  # a diffusers directory is not a converted one
        checkpoint_io.read_config(diffusers_model[0])


def test_restore_rejects_mismatched_target(diffusers_model, tmp_path):
    src, _, config = diffusers_model
    convert.convert(src, tmp_path / "out", dtype="float32", progress=False)
    shapes = hf_keys.param_shapes(config)
    target = hf_keys.unflatten({p: jax.ShapeDtypeStruct(s, np.float32) for p, s in shapes.items()})
    del target["proj_out"]
    with pytest.raises(CheckpointError, match="proj_out"):
        checkpoint_io.restore_params(tmp_path / "out", target)
    target["proj_out"] = {"kernel": jax.ShapeDtypeStruct((3, 3), np.float32)}
    with pytest.raises(CheckpointError, match="shape"):
        checkpoint_io.restore_params(tmp_path / "out", target)
