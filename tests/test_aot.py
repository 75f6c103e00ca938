"""The ahead-of-time compile for a TPU slice (`python -m qwen_flash_jax.aot`), on a tiny full-scale-shaped config
and a 4-chip v5p slice: both steps compile for an edit batch, the memory and cost tables come out, a slice too small
for the state says `does not fit`, and bad input is one line with exit status 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("libtpu", reason="libtpu describes TPU slices (pip install 'qwen_flash_jax[tpu]')")

from qwen_flash_jax import aot, config_lib, sharding, topologies  # noqa: E402
from qwen_flash_jax.models.config import ConfigError  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TEXT_WIDTH = 32


def _text_encoder_dir(path: Path) -> Path:
    """Only a Qwen3-VL config.json: the compile reads sizes, never weights."""
    config = json.loads(json.dumps(aot.QWEN3_VL_8B))
    config["text_config"].update(
        vocab_size=512, hidden_size=TEXT_WIDTH, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
    )
    config["text_config"].update(num_key_value_heads=2, head_dim=8)
    config["text_config"]["rope_parameters"]["mrope_section"] = [2, 1, 1]
    config["vision_config"].update(
        depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=TEXT_WIDTH
    )
    config["vision_config"].update(num_position_embeddings=16, deepstack_visual_indexes=[0])
    config["image_token_id"] = 500
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    # Pixel limits that admit the tiny 64px condition images (the published ones start at 256x256).
    preprocessor = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3, patch_size=16, merge_size=2, temporal_patch_size=2)
    preprocessor["size"] = dict(shortest_edge=32 * 32, longest_edge=1024 * 1024)
    (path / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return path


def tiny_config(tmp_path):
    config = config_lib.load_config(str(REPO / "configs/5to5.py"))
    config.model.update(
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        in_channels=8,
        out_channels=8,
        context_in_dim=TEXT_WIDTH,
        axes_dims_rope=(4, 6, 6),
    )
    config.text_encoder.path = str(_text_encoder_dir(tmp_path / "text_encoder"))
    config.data.update(image_size=64, batch_size=4, max_prompt_tokens=32, edit_prompt_tokens=48)
    return config


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    config = tiny_config(tmp_path_factory.mktemp("aot"))
    slice_ = topologies.get("v5p:2x2x1")
    # The edit task only (its conditioning runs the vision tower too): two compiles, not four.
    return aot.compile_steps(config, slice_, (("fsdp", 2), ("tensor", 2)), "bfloat16", ("edit",), log=print)


# The two compiles (`reports`, ~30 s on 2 cores) are the aot job's own work, so these tests are in the job tier; the
# one-line errors below stay in the quick tier.
@pytest.mark.job
def test_tiny_config_compiles_for_a_v5p_slice(reports, capsys):
    assert [r.name for r in reports] == ["critic/edit", "generator/edit"]
    for report in reports:
        assert report.arguments > 0 and report.temporaries > 0 and report.flops > 0 and report.model_flops > 0
        assert report.aliased > 0  # the state is donated: its new value is written over the old
    # The generator also runs the teachers and the fake score.
    assert reports[1].flops > reports[0].flops and reports[1].model_flops > reports[0].model_flops
    assert aot.summarise(reports, topologies.get("v5p:2x2x1"), 5, ("edit",))
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out[:3]] == ["critic/edit", "generator/edit", "iteration/edit:"]
    assert out[-1].startswith("fits: largest per-device peak")


@pytest.mark.job
def test_a_slice_too_small_does_not_fit(reports, capsys):
    tiny_chip = topologies.Slice("v5p-tiny", "v5p:2x2x1", topologies.Chip("TPU v5p", 1e-4, 459.0))
    assert not aot.summarise(reports, tiny_chip, 5, ("edit",))
    assert capsys.readouterr().out.splitlines()[-1].startswith("does not fit: largest per-device peak")


@pytest.mark.job
def test_with_precomputed_text_states_the_steps_run_no_text_encoder(reports, tmp_path):
    """`data.precompute_text`: the encoder's weights leave the step's arguments and its forward (the vision tower's
    too) the step's FLOPs; the batch's states come in instead. The critic (one encoder pass in the other program)."""
    config = tiny_config(tmp_path)
    config.data.precompute_text = True
    slice_ = topologies.get("v5p:2x2x1")
    (report,) = aot.compile_steps(
        config, slice_, (("fsdp", 2), ("tensor", 2)), "bfloat16", ("edit",), log=print, steps=("critic",)
    )
    encoding = reports[0]
    assert report.name == encoding.name == "critic/edit"
    assert 0 < report.flops < encoding.flops and 0 < report.model_flops < encoding.model_flops
    assert 0 < report.arguments < encoding.arguments


@pytest.mark.job
def test_each_edit_layout_compiles_with_its_own_sequence(reports, tmp_path):
    """`data.edit_layouts`: the run's batches are one edit per layout, and a layout of two condition images (64x64
    and 32x96 px, the output 32x96) compiles a longer sequence than the one square source: more FLOPs, larger
    arguments."""
    config = tiny_config(tmp_path)
    config.data.edit_layouts = (((64, 64), (32, 96)), ((64, 64),))
    assert aot.run_tasks(config) == ("t2i", "edit", "edit:1")
    config.data.task_ratio = "0:1"
    assert aot.run_tasks(config) == ("edit", "edit:1")
    slice_ = topologies.get("v5p:2x2x1")
    (report,) = aot.compile_steps(
        config, slice_, (("fsdp", 2), ("tensor", 2)), "bfloat16", ("edit",), log=print, steps=("critic",)
    )
    square = reports[0]
    assert report.name == square.name == "critic/edit"
    assert report.model_flops > square.model_flops and report.arguments > square.arguments


def test_an_invalid_time_estimate_gives_no_time_and_no_mfu(capsys):
    """libtpu's cost model gives v6e programs a negative `optimal_seconds`: shown as no estimate, not as a time.
    A valid one times the update's model FLOPs at XLA's projected rate (XLA counts each loop body once)."""
    gib = 2**30
    reports = [
        aot.StepReport(f"{step}/edit", 4 * gib, 2 * gib, 2 * gib, 10 * gib, 9e13, seconds, model_flops=3.6e14)
        for step, seconds in (("critic", 0.5), ("generator", -110.7))
    ]
    assert aot.summarise(reports, topologies.get("v6e-16"), 5, ("edit",))
    critic, generator, iteration, verdict = capsys.readouterr().out.splitlines()
    assert "  360.0 TFLOP  est    2.000 s  MFU  19.6%" in critic  # 9e13 FLOP in 0.5 s: 19.6% of 918 TFLOP/s
    assert "est none (XLA's estimate: -110.7 s)" in generator and "MFU" not in generator
    assert iteration == "iteration/edit: no estimate (XLA gives no valid time for a step)"
    assert verdict == "fits: largest per-device peak 14.00 GiB (critic/edit) of 32 GiB"


@pytest.mark.parametrize("name, chips", [("v4-32", 16), ("v5p-16", 8), ("v5e-16", 16), ("v6e-256", 256)])
def test_a_named_slice_has_one_device_per_chip(name, chips):
    """v4 and v5p names count TensorCores, two per chip, and JAX runs each chip as one device."""
    assert len(topologies.devices(topologies.get(name))) == topologies.get(name).chips == chips


def test_a_mesh_axis_that_is_no_product_of_physical_axes_splits_one():
    """fsdp 64 x tensor 4 on v6e-256's 16x16 torus (jax.make_mesh refuses it): each tensor group is 4 neighbouring
    chips of one row of the torus, and the fsdp axis runs over the rest."""
    mesh = sharding.make_mesh((("data", 1), ("fsdp", 64), ("tensor", 4)), topologies.devices(topologies.get("v6e-256")))
    assert dict(mesh.shape) == {"data": 1, "fsdp": 64, "tensor": 4}
    assert len({d.id for d in mesh.devices.flat}) == 256
    for group in mesh.devices[0]:
        xs, ys = zip(*[d.coords[:2] for d in group])
        assert len(set(ys)) == 1 and sorted(xs) == list(range(min(xs), min(xs) + 4)), [d.coords for d in group]


def test_bad_input_is_one_line():
    with pytest.raises(ConfigError, match="unknown TPU slice 'v9-8'"):
        topologies.get("v9-8")
    with pytest.raises(ConfigError, match="--steps: takes some of critic, generator, got critic, gen"):
        aot.compile_steps(None, topologies.get("v5p:2x2x1"), (), "", ("edit",), steps=("critic", "gen"))
    with pytest.raises(ConfigError, match="--mesh takes name:size pairs"):
        aot.parse_mesh("fsdp=8", (("data", 1), ("fsdp", -1)))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "qwen_flash_jax.aot", "--config=configs/5to5.py", "--topology=v7-8"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "unknown TPU slice 'v7-8'" in errors[0] and "Traceback" not in proc.stderr
