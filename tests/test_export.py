"""`python -m qwen_flash_jax.export`: a training workdir's student as a diffusers Qwen-Image 2.1 pipeline folder or
LoRA, checked by loading it with diffusers. The base is a tiny random pipeline folder built here, the workdir a
distillation checkpoint whose student and EMA are the base's transformer plus random changes
(tests/qwen_image_folder.py)."""

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import qwen_flash_jax  # noqa: E402
from qwen_flash_jax import distilled, export, lora  # noqa: E402
from qwen_flash_jax.models import hf_keys  # noqa: E402
from qwen_flash_jax.models.config import TransformerConfig  # noqa: E402
from tests import qwen_image_folder as folder_lib  # noqa: E402

EXPLICIT_TIMES = (1.0, 0.75, 0.5, 0.25)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The base pipeline folder, a workdir with student and EMA, one with the student only, their weights."""
    root = tmp_path_factory.mktemp("export")
    base = folder_lib.pipeline_folder(root / "base")
    params = folder_lib.transformer_params(base)
    student, ema = folder_lib.perturbed(params, 1), folder_lib.perturbed(params, 2)
    return dict(
        root=root,
        base=base,
        base_params=params,
        student=student,
        ema=ema,
        workdir=folder_lib.training_workdir(root / "run", student, ema),
        no_ema=folder_lib.training_workdir(root / "run_no_ema", student),
    )


def _export(run, dst, *extra, config=()):
    args = ["--workdir", str(run["workdir"]), "--base", str(run["base"]), "--dst", str(dst), "--quiet"]
    export.main([*args, *folder_lib.config_args(**dict(config)), *extra])
    return dst


@pytest.fixture(scope="module")
def exported(run):
    """The student exported with the full-scale config's schedule (fresh noise), in shards of at most 64 KiB."""
    return _export(run, run["root"] / "exported", "--max_shard_mb", "0.0625")


def _flat(tree, prefix=""):
    """{"blocks/attn/to_q/kernel": array, ...} of a nested parameter dict."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}/"))
        else:
            out[prefix + key] = np.asarray(value)
    return out


def _diffusers_params(model):
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return hf_keys.state_dict_to_params(state, TransformerConfig(**folder_lib.TRANSFORMER))


def test_the_exported_transformer_holds_the_students_weights_exactly(run, exported):
    from diffusers import QwenImage21Transformer2DModel

    shards = sorted(p.name for p in (exported / "transformer").glob("*.safetensors"))
    assert len(shards) > 1 and shards[0].endswith("-00001-of-%05d.safetensors" % len(shards))
    index = json.loads((exported / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    model = QwenImage21Transformer2DModel.from_pretrained(exported / "transformer", torch_dtype=torch.float32)
    got, want = _flat(_diffusers_params(model)), _flat(run["student"])
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert not np.array_equal(got["img_in/kernel"], _flat(run["base_params"])["img_in/kernel"])


def test_ema_exports_the_ema_weights(run):
    from diffusers import QwenImage21Transformer2DModel

    dst = _export(run, run["root"] / "exported_ema", "--ema")
    model = QwenImage21Transformer2DModel.from_pretrained(dst / "transformer", torch_dtype=torch.float32)
    got, want = _flat(_diffusers_params(model)), _flat(run["ema"])
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def _pipeline(run, folder):
    from diffusers import QwenImage21Pipeline

    return QwenImage21Pipeline.from_pretrained(folder, processor=folder_lib.processor(run["base"]))


def _scheduler_sigmas(pipe, image_seq_len):
    from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import calculate_shift, retrieve_timesteps

    config = pipe.scheduler.config
    mu = calculate_shift(
        image_seq_len, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift
    )
    retrieve_timesteps(pipe.scheduler, None, "cpu", sigmas=pipe.config.sample_sigmas, mu=mu)
    return pipe.scheduler.sigmas.numpy()


def test_the_pipeline_loads_and_samples_at_the_students_times_with_fresh_noise(run, exported):
    from qwen_flash_jax.distill import dmd
    from qwen_flash_jax.train import teacher

    pipe = _pipeline(run, exported)
    config = distilled.load_run_config("configs/5to5.py")
    want = dmd.student_timesteps(4, teacher.target_mu(config))  # the full-scale student's shifted schedule
    for tokens in (16, 4096):  # the time shift of the base is off: any output size samples at these times
        np.testing.assert_array_equal(_scheduler_sigmas(pipe, tokens), np.append(want, 0.0).astype(np.float32))
    assert pipe.scheduler.config.stochastic_sampling is True
    assert (exported / "vae").is_symlink() and (exported / "text_encoder").resolve() == run["base"] / "text_encoder"


@pytest.fixture(scope="module")
def exported_euler(run):
    """The student of a run with explicit times and re-noising by its own velocity (Euler steps)."""
    return _export(run, run["root"] / "exported_euler", config=dict(timesteps=EXPLICIT_TIMES, renoise="predicted"))


def test_a_student_that_renoises_with_its_own_velocity_samples_with_euler_steps(run, exported_euler):
    pipe = _pipeline(run, exported_euler)
    np.testing.assert_array_equal(_scheduler_sigmas(pipe, 64), np.float32([*EXPLICIT_TIMES, 0.0]))
    assert pipe.scheduler.config.stochastic_sampling is False


def _lora_pairs(folder):
    from safetensors.numpy import load_file

    tensors = load_file(str(folder / lora.LORA_FILE))
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in tensors})
    assert len(tensors) == 2 * len(modules) and all(k.startswith(lora.PREFIX) for k in tensors)
    return {
        m.removeprefix(lora.PREFIX): (tensors[f"{m}.lora_A.weight"], tensors[f"{m}.lora_B.weight"]) for m in modules
    }


def _relative_error(state, run):
    """||student - merged|| / ||student - base|| over every weight, in diffusers' layout."""
    config = TransformerConfig(**folder_lib.TRANSFORMER)
    merged = _flat(hf_keys.state_dict_to_params(state, config, np.float64))
    student, base = _flat(run["student"]), _flat(run["base_params"])
    residual = sum(np.sum((student[k].astype(np.float64) - merged[k]) ** 2) for k in student)
    total = sum(np.sum((student[k].astype(np.float64) - base[k]) ** 2) for k in student)
    return float(np.sqrt(residual / total))


def test_the_lora_merged_onto_the_base_gives_the_student_within_the_reported_error(run, capsys):
    from diffusers import QwenImage21Transformer2DModel

    dst = _export(run, run["root"] / "lora4", "--lora", "4")
    assert "relative reconstruction error" in capsys.readouterr().out
    report = json.loads((dst / export.LORA_REPORT).read_text())
    assert report["rank"] == 4 and 0 < report["relative_error"] < 1
    base = QwenImage21Transformer2DModel.from_pretrained(run["base"] / "transformer", torch_dtype=torch.float32)
    linears = {name for name, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    pairs = _lora_pairs(dst)
    assert set(pairs) == linears  # one pair per Linear, in diffusers' module names
    state = {k: v.detach().numpy().astype(np.float64) for k, v in base.state_dict().items()}
    for module, (a, b) in pairs.items():
        assert a.shape[0] == b.shape[1] == min(4, *state[f"{module}.weight"].shape)
        state[f"{module}.weight"] = state[f"{module}.weight"] + b.astype(np.float64) @ a.astype(np.float64)
    assert _relative_error(state, run) == pytest.approx(report["relative_error"], rel=1e-4)
    assert report["scheduler"]["stochastic_sampling"] is True and len(report["sample_sigmas"]) == 4


def test_load_lora_weights_reads_the_lora(run):
    """diffusers' own loader (it needs the peft package) merges the LoRA into the weights counted above."""
    pytest.importorskip("peft", reason="QwenImage21Pipeline.load_lora_weights needs the peft package")
    dst = run["root"] / "lora4_peft"
    if not dst.exists():
        _export(run, dst, "--lora", "4")
    pipe = _pipeline(run, run["base"])
    pipe.load_lora_weights(dst)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    state = {k: v.detach().numpy().astype(np.float64) for k, v in pipe.transformer.state_dict().items()}
    report = json.loads((dst / export.LORA_REPORT).read_text())
    assert _relative_error(state, run) == pytest.approx(report["relative_error"], rel=1e-3)


def test_the_lora_error_falls_with_the_rank(run):
    config = distilled.load_run_config("configs/5to5.py")
    errors = []
    for rank in (1, 2, 4, 32):
        report = export.export(
            run["workdir"], run["base"], run["root"] / f"lora_rank{rank}", config=config, lora_rank=rank
        )
        errors.append(report["relative_error"])
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    # At full rank (32 = the model width) the Linear weights are exact: what is left are the norm scales.
    assert errors[-1] == pytest.approx(report["norm_scales_share"], rel=1e-6) and errors[-1] > 0


def _copy_base(run, name):
    copy = run["root"] / name
    if not copy.exists():
        shutil.copytree(run["base"], copy)
    return copy


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing workdir", "does not exist or is not a directory"),
        ("no checkpoint", "has no complete training checkpoint"),
        ("base missing a component", "lacks the component folder(s) vae"),
        ("base without model_index.json", "has no model_index.json"),
        ("wrong transformer class", "describes a FluxTransformer2DModel, not a QwenImage21Transformer2DModel"),
        ("ema without ema", "kept no EMA of the student"),
        ("rank 0", "the LoRA rank must be a positive integer, got 0"),
        ("rank not a number", "argument --lora: invalid int value"),
        ("destination exists", "already exists"),
        ("destination under a file", "cannot write there"),
        ("transformer of another size", "do not fit the base's transformer"),
    ],
)
def test_bad_input_is_one_line_and_exit_2_and_writes_nothing(run, tmp_path, capsys, case, message):
    workdir, base, dst, extra = run["workdir"], run["base"], tmp_path / "out", []
    if case == "missing workdir":
        workdir = tmp_path / "nope"
    elif case == "no checkpoint":
        workdir = tmp_path / "empty_run"
        (workdir / "checkpoints").mkdir(parents=True)
    elif case == "base missing a component":
        base = _copy_base(run, "base_no_vae")
        shutil.rmtree(base / "vae", ignore_errors=True)
    elif case == "base without model_index.json":
        base = _copy_base(run, "base_no_index")
        (base / "model_index.json").unlink(missing_ok=True)
    elif case == "wrong transformer class":
        base = _copy_base(run, "base_flux")
        config = json.loads((base / "transformer" / "config.json").read_text())
        (base / "transformer" / "config.json").write_text(
            json.dumps({**config, "_class_name": "FluxTransformer2DModel"})
        )
    elif case == "ema without ema":
        workdir, extra = run["no_ema"], ["--ema"]
    elif case == "rank 0":
        extra = ["--lora", "0"]
    elif case == "rank not a number":
        extra = ["--lora", "four"]
    elif case == "destination exists":
        dst.mkdir()
    elif case == "destination under a file":
        (tmp_path / "a_file").write_text("")
        dst = tmp_path / "a_file" / "out"
    elif case == "transformer of another size":
        base = _copy_base(run, "base_3_layers")
        config = json.loads((base / "transformer" / "config.json").read_text())
        (base / "transformer" / "config.json").write_text(json.dumps({**config, "num_layers": 3}))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        export.main(
            ["--workdir", str(workdir), "--base", str(base), "--dst", str(dst), "--quiet", *extra]
            + folder_lib.config_args()
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    if case != "destination exists":
        assert not dst.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_diffusers_samples_the_exported_student_as_qwen_flash_jax_pipeline_does(run, exported_euler):
    """Same packed latents, the Euler student (deterministic): diffusers' pipeline on the exported folder and
    `qwen_flash_jax.Pipeline` on the same folder give the same image within 2e-3 on [0, 1]."""
    height = width = 64
    tokens = (height // 16) * (width // 16)
    latents = np.random.default_rng(0).standard_normal((1, tokens, folder_lib.LATENT_CHANNELS)).astype(np.float32)
    ours = qwen_flash_jax.Pipeline.from_pretrained(exported_euler, dtype="float32")
    got = ours(prompt="a red house by a lake", height=height, width=width, latents=latents, output_type="np").images
    reference = _pipeline(run, exported_euler)
    want = reference(
        prompt="a red house by a lake",
        height=height,
        width=width,
        latents=torch.from_numpy(latents),
        output_type="np",
    ).images
    assert np.abs(np.asarray(got, np.float32) - np.asarray(want, np.float32)).max() < 2e-3
