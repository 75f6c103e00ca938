"""The distillation job end to end on a tiny toy world: it trains, resumes exactly, and stops on NaNs."""

import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from qwen_flash_jax.train import distill_job
from tests.helpers import tiny_distill_config

pytestmark = pytest.mark.job  # whole distillation runs


@pytest.fixture
def cache(toy_cache):
    return toy_cache


QUIET = dict(log=lambda *_: None, evaluate=False)


def _interrupted_copy(finished, workdir, last_step):
    """`workdir` as a run of `finished`'s config interrupted after its checkpoint at `last_step` leaves it: a copy of
    the finished run without the later checkpoints. The state at a checkpoint does not depend on the steps after
    it, so this replaces running the first steps a second time (real kills: the kill-during-a-save test here and
    tests/test_multiprocess.py; `stop_at`: tests/test_training_loop.py and tests/test_teacher.py)."""
    shutil.copytree(finished, workdir)
    checkpoints = workdir / "checkpoints"
    later = [p for p in checkpoints.iterdir() if p.name.isdigit() and int(p.name) > last_step]
    assert later and (checkpoints / str(last_step)).is_dir(), sorted(p.name for p in checkpoints.iterdir())
    for p in later:
        shutil.rmtree(p)


@pytest.fixture(scope="module")
def straight_run(toy_cache, tmp_path_factory):
    """Per-step metrics of one uninterrupted tiny run, the reference the resumed runs must repeat."""
    history = []
    distill_job.distill(tiny_distill_config(toy_cache), tmp_path_factory.mktemp("straight"), history=history, **QUIET)
    return history


@pytest.mark.sharded  # the toy mesh is data parallel: the batch splits over the 8 devices
def test_resumed_distillation_reproduces_the_uninterrupted_losses_exactly(cache, tmp_path):
    """A run interrupted after its checkpoint at step 2 and resumed on the 8-device mesh repeats the uninterrupted
    run's losses bit for bit: the checkpoint is restored into the mesh's shardings. 4 steps of one task (not the
    module's 6-step `straight_run`), and the interrupted run is the finished one's copy without its later
    checkpoints (`_interrupted_copy`): in this child every step and every compilation is several times slower."""
    config = tiny_distill_config(cache)
    config.train.steps = 4
    config.data.task_ratio = "1:0"  # half the compilations (the task slots resume in the one-device tests below)
    straight, resumed = [], []
    distill_job.distill(config, tmp_path / "a", history=straight, **QUIET)
    assert len(straight) == 4 and all(m["skipped"] == 0 for _, m in straight)
    _interrupted_copy(tmp_path / "a", tmp_path / "b", last_step=2)
    distill_job.distill(config, tmp_path / "b", history=resumed, **QUIET)
    assert resumed[0][0] == 3  # the last complete checkpoint was step 2
    assert [m for s, m in straight if s > 2] == [m for _, m in resumed]


def test_a_job_killed_during_a_save_resumes_from_the_last_complete_checkpoint(cache, straight_run, tmp_path):
    workdir = tmp_path / "killed"
    killed = subprocess.run(
        [sys.executable, "-m", "tests.distill_kill_worker", str(cache), str(workdir), "4"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    left = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    assert "2" in left and "4" not in left  # step 4 was being written: only a temporary directory holds it
    assert any(name.startswith("4") for name in left), left

    resumed = []
    distill_job.distill(tiny_distill_config(cache), workdir, history=resumed, **QUIET)
    assert resumed[0][0] == 3
    assert [m for s, m in straight_run if s > 2] == [m for _, m in resumed]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["4", "6"]  # temporaries cleaned up


def test_a_run_of_nonfinite_steps_stops_with_the_last_good_checkpoint(cache, tmp_path):
    config = tiny_distill_config(cache)
    config.student.learning_rate = 1e30  # the first update blows the student up; every later step is non-finite
    config.nonfinite_limit = 3
    config.data.task_ratio = "1:0"  # one task is enough here: half the compilations
    with pytest.raises(distill_job.NonFiniteError, match="Last good checkpoint"):
        distill_job.distill(config, tmp_path / "nan", log=lambda *_: None, evaluate=False)


def test_the_job_evaluates_the_student_and_writes_results_grids_and_probes(cache, tmp_path, monkeypatch):
    import json

    from qwen_flash_jax.eval import judge as judge_lib
    from qwen_flash_jax.eval import judge_io

    quick_judge = judge_lib.train_judge(size=16, seed=0, log=None, steps=40, n_reference=64, n_eval=32)
    monkeypatch.setattr(judge_io, "load_or_train_judge", lambda *args, **kwargs: quick_judge)
    config = tiny_distill_config(cache)
    config.train.update(steps=2, sample_every=2)
    config.data.task_ratio = "1:1"
    # Single-specialist guidance (configs/guidance.py:single): the base teacher that the student starts from,
    # and that the evaluation compares against, guides nothing.
    config.guidance.teachers = ("text",)
    config.guidance.weights = (("*", ({"text": 1.0},) * config.student.num_steps),)
    # Student times off the teacher's shifted schedule: the teacher is also evaluated on the student's times.
    config.student.timesteps = (1.0, 0.8, 0.5, 0.2)
    workdir = tmp_path / "evaluated"
    lines = []
    results = distill_job.distill(config, workdir, log=lines.append)

    assert list(results) == [
        "teacher base (2 steps)",
        "teacher base (4 steps)",
        "teacher base (4 steps, student's times)",
        "student (4 steps)",
    ]
    for name, r in results.items():
        for task in ("t2i", "edit"):
            assert 1.0 <= r[f"{task}_average"] <= 5.0, (name, task, r)
    assert json.loads((workdir / "results.json").read_text()) == results
    assert "| student (4 steps) | 4 |" in (workdir / "results.md").read_text()
    for grid in (
        "grid_t2i.png",
        "grid_edit.png",
        "samples/step_000000/grid_t2i.png",
        "samples/step_000002/grid_edit.png",
    ):
        assert (workdir / grid).stat().st_size > 500, grid
    assert sum(line.startswith("probe at step") for line in lines) == 2

    # The same command again: the run is complete, so it only evaluates, and the frozen teacher's rows now come
    # from the shared image cache, with the same scores.
    again = []
    assert distill_job.distill(config, workdir, log=again.append) == results
    reused = [line for line in again if "its images from" in line]
    assert len(reused) == 3 and all(line.startswith("evaluating teacher base") for line in reused), again


def test_with_the_gan_term_a_resumed_run_reproduces_the_uninterrupted_one(cache, tmp_path):
    """The discriminator head and its optimiser are part of the checkpoint: the resumed critic continues exactly."""
    config = tiny_distill_config(cache)
    config.student.gan_weight = 10.0
    config.train.steps = 4
    config.data.task_ratio = "1:0"  # one task is enough here: half the compilations
    straight, resumed = [], []
    distill_job.distill(config, tmp_path / "a", history=straight, **QUIET)
    _interrupted_copy(tmp_path / "a", tmp_path / "b", last_step=2)
    distill_job.distill(config, tmp_path / "b", history=resumed, **QUIET)
    assert resumed[0][0] == 3 and all(m["skipped"] == 0 for _, m in straight)
    # The head's logit layer starts at zero and its first update is warm-up (lr 0): the GAN gradient reaches the
    # student from step 2, and the head's accuracy (measured before each critic update) moves off 0 after that.
    assert all(m["gan_grad_ratio"] > 0 for s, m in straight if s > 1) and straight[-1][1]["disc_accuracy"] > 0
    assert [m for s, m in straight if s > 2] == [m for _, m in resumed]


def test_the_gan_term_reaches_only_the_tasks_in_gan_tasks(cache, straight_run, tmp_path):
    """At 1:1 the updates run T2I, edit, T2I, edit. A GAN term kept to edits leaves the first (T2I) update
    bit-identical to pure DMD (`straight_run`), critic updates included, and reaches the edit updates only (the
    odd-warm-up test below shows a term kept to T2I at the T2I updates). A GAN term whose tasks are never trained at
    the configured ratio is a config error, not a silent no-op."""
    config = tiny_distill_config(cache)
    config.train.steps = 4
    config.student.gan_weight = 10.0
    config.student.gan_tasks = ("edit",)
    on_edits = []
    distill_job.distill(config, tmp_path / "on_edits", history=on_edits, **QUIET)
    assert "gan_loss" not in straight_run[0][1] and on_edits[0] == straight_run[0]
    assert ["gan_loss" in m for _, m in on_edits] == [False, True, False, True]
    assert on_edits[3][1]["gan_grad_ratio"] > 0  # the head starts at zero: the first GAN update has no gradient
    config.student.gan_tasks = ("t2i", "video")
    with pytest.raises(distill_job.ConfigError, match=r"student.gan_tasks names unknown tasks \['video'\]"):
        distill_job.check_config(config)
    config.data.task_ratio = "0:1"
    for tasks in (("t2i",), ()):
        config.student.gan_tasks = tasks
        with pytest.raises(distill_job.ConfigError, match="the GAN term would never run"):
            distill_job.check_config(config)


def test_generator_updates_follow_the_task_ratio_after_an_odd_critic_warmup(cache, tmp_path):
    """At 1:1 half the generator updates are T2I, seen through a GAN term kept to T2I: its loss is logged exactly at
    the T2I updates, which alternate with the edit updates, also after an odd number of critic warm-up updates (the
    warm-up batches must not shift the task slots). The GAN-tasks test above shows a term kept to edits."""
    config = tiny_distill_config(cache)
    config.train.steps = 4
    config.student.gan_weight = 10.0
    config.student.gan_tasks = ("t2i",)
    config.fake_score.warmup_updates = 1
    history = []
    distill_job.distill(config, tmp_path / "run", history=history, **QUIET)
    carried = ["gan_loss" in m for _, m in history]
    assert carried in ([True, False, True, False], [False, True, False, True]), carried


def test_fake_score_warmup_runs_before_the_first_student_update_and_resumes_exactly(cache, straight_run, tmp_path):
    """Warm-up critic updates happen at step 0 only: the first generator update already sees a trained fake score
    (its DMD loss differs from the plain run's), and a resumed run still repeats the uninterrupted one."""
    config = tiny_distill_config(cache)
    config.fake_score.warmup_updates = 3
    config.train.steps = 4
    straight, resumed = [], []
    distill_job.distill(config, tmp_path / "a", history=straight, **QUIET)
    _interrupted_copy(tmp_path / "a", tmp_path / "b", last_step=2)
    distill_job.distill(config, tmp_path / "b", history=resumed, **QUIET)
    assert straight[0][1]["dmd_loss"] != straight_run[0][1]["dmd_loss"]
    assert resumed[0][0] == 3 and [m for s, m in straight if s > 2] == [m for _, m in resumed]


def test_a_negative_fake_score_warmup_is_a_config_error(cache, tmp_path):
    config = tiny_distill_config(cache)
    config.fake_score.warmup_updates = -1
    with pytest.raises(distill_job.ConfigError, match="warmup_updates"):
        distill_job.distill(config, tmp_path / "w", **QUIET)
    assert not (tmp_path / "w").exists()


def test_both_renoising_modes_train_and_a_bad_mode_is_a_config_error(cache, straight_run, tmp_path):
    """The re-noising mode changes the student's inputs at steps k > 0 (fresh noise instead of the toy default's
    Euler steps), so the run's DMD losses differ from the default run's once such a step is drawn; an unknown mode
    stops the job before it creates its workdir."""
    config = tiny_distill_config(cache)
    assert config.student.renoise == "predicted"
    config.student.renoise = "fresh"
    config.train.steps = 4
    history = []
    distill_job.distill(config, tmp_path / "p", history=history, **QUIET)
    assert all(m["skipped"] == 0 and np.isfinite(m["dmd_loss"]) for _, m in history)
    later = [(m, ref) for (_, m), (_, ref) in zip(history, straight_run) if m["k"] > 0 and ref["k"] == m["k"]]
    assert later and all(m["dmd_loss"] != ref["dmd_loss"] for m, ref in later)
    config.student.renoise = "ddim"
    with pytest.raises(distill_job.ConfigError, match="student.renoise"):
        distill_job.distill(config, tmp_path / "w", **QUIET)
    assert not (tmp_path / "w").exists()


def test_the_decoupled_schedule_adds_the_cfg_term_alone_and_a_bad_schedule_is_a_config_error(
    cache, straight_run, tmp_path
):
    """Decoupled (the toy default) = distribution matching against the conditional teachers + the CFG term. Its
    first distribution-matching loss (`straight_run`, with CFG) is the shared schedule's whole loss at CFG 1 (the same
    state and draws, and no CFG term there), and the CFG term comes on top."""
    config = tiny_distill_config(cache)
    assert config.guidance.schedule == "decoupled" and config.guidance.cfg_scale > 1
    config.train.steps = 2  # (a 1-step run has no learning-rate warm-up: its first critic updates would differ)
    config.guidance.update(cfg_scale=1.0, schedule="shared")
    shared = []
    distill_job.distill(config, tmp_path / "shared", history=shared, **QUIET)
    assert len(shared) == 2 and "ca_loss" not in shared[0][1]
    assert straight_run[0][1]["dm_loss"] == shared[0][1]["dmd_loss"]
    for _, m in straight_run:
        assert m["ca_loss"] > 0 and m["dmd_loss"] == pytest.approx(m["dm_loss"] + m["ca_loss"], rel=1e-5)
    config.guidance.schedule = "split"
    with pytest.raises(distill_job.ConfigError, match="guidance.schedule"):
        distill_job.distill(config, tmp_path / "w", **QUIET)
    assert not (tmp_path / "w").exists()


def _regression_config(cache):
    config = tiny_distill_config(cache)
    config.student.update(renoise="predicted", regression_weight=1.0, regression_batches=2)
    return config


def test_regression_pulls_the_student_onto_the_teachers_samples_and_resumes_exactly(cache, tmp_path):
    """A 1-step student (so every update regresses the same pairs from the same noise) with the regression term
    dominating DMD: its distance to the teacher's multi-step samples falls, per task. The pair bank is rebuilt
    deterministically on resume and indexed by the update, so an interrupted run repeats the uninterrupted one's
    losses exactly. With fresh re-noising the term is a config error before any work."""
    config = _regression_config(cache)
    config.student.update(num_steps=1, timesteps=(), regression_weight=100.0, learning_rate=1e-3)
    config.fake_score.step_probs = ()  # the toy's (0, 0, 0, 1) names 4 steps
    config.guidance.weights = (("*", ({"base": 1.0},)),)
    config.train.update(steps=12, checkpoint_every=8)
    straight, resumed = [], []
    distill_job.distill(config, tmp_path / "a", history=straight, **QUIET)
    assert all(m["skipped"] == 0 and m["regression_loss"] > 0 for _, m in straight)
    losses = [m["regression_loss"] for _, m in straight]
    # 1:1 ratio: updates alternate between the T2I and the edit bank batch.
    for task_losses in (losses[0::2], losses[1::2]):
        assert task_losses[-1] < 0.7 * task_losses[0], task_losses
    _interrupted_copy(tmp_path / "a", tmp_path / "b", last_step=8)
    distill_job.distill(config, tmp_path / "b", history=resumed, **QUIET)
    assert resumed[0][0] == 9 and [m for s, m in straight if s > 8] == [m for _, m in resumed]
    config.student.renoise = "fresh"
    with pytest.raises(distill_job.ConfigError, match="renoise='predicted'"):
        distill_job.distill(config, tmp_path / "w", **QUIET)
    assert not (tmp_path / "w").exists()


def test_the_teacher_sampled_on_given_timesteps(cache):
    """`Generator`'s explicit teacher timesteps: the shifted schedule given explicitly reproduces the default
    sampler exactly, other times give other samples."""
    from qwen_flash_jax import config_lib, flow
    from qwen_flash_jax.eval.generate import Generator
    from qwen_flash_jax.loading import from_params
    from qwen_flash_jax.train import assets as assets_lib
    from qwen_flash_jax.train import teacher

    config = tiny_distill_config(cache)
    assets = assets_lib.build_assets(config, log=lambda *_: None)
    params = teacher.ensure_teacher(config, "base", log=lambda *_: None, assets=assets)
    mu = teacher.target_mu(config)
    gen = Generator(from_params(config_lib.transformer_config(config), params), assets, mu, batch_size=2)
    captions = ["a red sky over a lake", "a portrait with glasses"]
    default = gen.t2i(params, captions, num_steps=4, cfg_scale=2.0)
    explicit = gen.t2i(
        params, captions, num_steps=4, cfg_scale=2.0, timesteps=tuple(flow.sampling_sigmas(4, mu)[:-1].tolist())
    )
    other = gen.t2i(params, captions, num_steps=4, cfg_scale=2.0, timesteps=(1.0, 0.8, 0.5, 0.2))
    np.testing.assert_array_equal(explicit, default)
    assert np.abs(other.astype(int) - default.astype(int)).mean() > 1.0


def test_a_distillation_on_precomputed_text_states_repeats_the_one_that_encodes_in_its_steps(
    cache, straight_run, tmp_path
):
    """`data.precompute_text`: the steps read the stored states and get no text encoder (the job releases it), and
    the losses are the uninterrupted run's (float32; the states were encoded in other batches than the steps', so
    equal up to rounding: relative differences of 1e-7 to 7e-7 were seen)."""
    config = tiny_distill_config(cache)
    config.data.precompute_text = True
    stored = []
    distill_job.distill(config, tmp_path, history=stored, **QUIET)
    assert [s for s, _ in stored] == [s for s, _ in straight_run]
    for (_, a), (_, b) in zip(straight_run, stored):
        for key in ("dmd_loss", "fake_loss", "grad_norm"):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-5, err_msg=key)


def test_a_replicate_seed_changes_the_distillation_but_not_the_teachers(cache, straight_run, tmp_path):
    """`train.seed` draws other noise, steps and batches (the losses differ from the first update on) while the
    teachers' cache key, and so the teachers, stay the same."""
    from qwen_flash_jax.train import teacher

    config = tiny_distill_config(cache)
    config.train.update(steps=2, seed=1)
    assert all(
        teacher.cache_dir(config, n) == teacher.cache_dir(tiny_distill_config(cache), n) for n in config.teachers
    )
    history = []
    distill_job.distill(config, tmp_path / "r", history=history, **QUIET)
    assert all(m["skipped"] == 0 for _, m in history)
    assert [m["dmd_loss"] for _, m in history] != [m["dmd_loss"] for _, m in straight_run[:2]]
    assert history[0][1]["fake_loss"] != straight_run[0][1]["fake_loss"]
