"""The shared training loop on a one-number model: logging means, save steps, early stop and resume, probes, and the
non-finite guard."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_flash_jax import training_loop
from qwen_flash_jax.train.checkpoint import abstract_like


class Counter:
    """A data stream whose state the checkpoint saves: it yields 1, 2, 3, ..."""

    def __init__(self):
        self.position = 0

    def __iter__(self):
        return self

    def __next__(self):
        self.position += 1
        return self.position

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = state["position"]


@jax.jit
def _step(state, batch):
    total = state["total"] + batch
    bad = jnp.isnan(total)
    state = {"step": state["step"] + 1, "total": total, "bad_run": jnp.where(bad, state["bad_run"] + 1, 0)}
    metrics = {"batch": jnp.float32(batch), "skipped": bad.astype(jnp.float32)}
    return state, metrics


def _state():
    return {"step": jnp.int32(0), "total": jnp.float32(0.0), "bad_run": jnp.int32(0)}


def _run(state, data, steps, **kwargs):
    return training_loop.run(
        state,
        _step,
        data,
        start=int(state["step"]),
        steps=steps,
        label="toy",
        data_iterator=data,
        **kwargs,
    )


def test_logs_interval_means_and_sums_at_each_interval_and_the_last_step():
    history, lines = [], []
    state, finished = _run(_state(), Counter(), 7, log=lines.append, log_every=3, history=history, sums=("skipped",))
    assert finished and int(state["step"]) == 7 and float(state["total"]) == 28.0
    assert [s for s, _ in history] == [3, 6, 7]
    assert [m["batch"] for _, m in history] == [2.0, 5.0, 7.0]  # means of 1..3, 4..6 and 7
    assert all(m["skipped"] == 0.0 for _, m in history)
    assert lines[0].startswith("toy step 3/7: batch 2.0000, skipped 0.0000 (") and lines[0].endswith("s)")


def test_metrics_a_step_does_not_report_are_averaged_over_the_steps_that_do():
    pending = [{"a": 1.0, "b": 4.0}, {"a": 3.0}, {"a": 5.0, "b": 2.0, "n": 1.0}, {"a": 0.0, "n": 2.0}]
    assert training_loop.mean_metrics(pending, sums=("n",)) == {"a": 2.25, "b": 3.0, "n": 3.0}


def test_saves_at_the_interval_and_after_the_last_step_only(tmp_path):
    ckpt = training_loop.Checkpointer(tmp_path / "every3", keep=10, every=3)
    _run(_state(), Counter(), 7, checkpointer=ckpt)
    assert sorted(int(p.name) for p in (tmp_path / "every3").iterdir()) == [3, 6, 7]
    never = training_loop.Checkpointer(tmp_path / "final_only", keep=10, every=0)
    _run(_state(), Counter(), 5, checkpointer=never)
    assert [p.name for p in (tmp_path / "final_only").iterdir()] == ["5"]


def test_a_stopped_run_resumes_from_its_checkpoint_to_the_same_state(tmp_path):
    straight, _ = _run(_state(), Counter(), 8, log=None)
    ckpt = training_loop.Checkpointer(tmp_path / "ckpt", every=2)
    stopped, finished = _run(_state(), Counter(), 8, checkpointer=ckpt, stop_at=5)
    assert not finished and int(stopped["step"]) == 5

    reopened = training_loop.Checkpointer(tmp_path / "ckpt", every=2)
    state, data_state, meta = reopened.restore(abstract_like(_state()))
    assert meta == {"step": 4} and data_state == {"position": 4}
    data = Counter()
    data.set_state(data_state)
    resumed, finished = _run(state, data, 8, checkpointer=reopened)
    assert finished
    jax.tree.map(np.testing.assert_array_equal, resumed, straight)


def test_probes_at_step_zero_of_a_fresh_run_and_every_interval():
    seen = []
    _run(_state(), Counter(), 5, probe=lambda step, state: seen.append((step, float(state["total"]))), probe_every=2)
    assert seen == [(0, 0.0), (2, 3.0), (4, 10.0)]
    resumed = []
    state = {"step": jnp.int32(3), "total": jnp.float32(6.0), "bad_run": jnp.int32(0)}
    _run(state, Counter(), 5, probe=lambda step, _: resumed.append(step), probe_every=2)
    assert resumed == [4]


def _poisoned(after: int):
    """1, 2, ..., then NaN from step `after` + 1 on."""
    for i in range(1, 100):
        yield float("nan") if i > after else float(i)


def test_a_run_of_nonfinite_steps_stops_the_job_naming_the_last_good_checkpoint(tmp_path):
    guard = training_loop.NonFiniteGuard(lambda state: state["bad_run"], limit=2, key="bad_run")
    ckpt = training_loop.Checkpointer(tmp_path / "ckpt", every=2)
    history = []
    with pytest.raises(training_loop.NonFiniteError, match=r"^2 consecutive steps .* Last good checkpoint: step 4 in"):
        training_loop.run(
            _state(),
            _step,
            _poisoned(after=4),
            start=0,
            steps=10,
            label="toy",
            log=None,
            log_every=2,
            history=history,
            nonfinite=guard,
            checkpointer=ckpt,
            data_iterator=Counter(),
        )
    assert [(s, m["bad_run"]) for s, m in history] == [(2, 0.0), (4, 0.0), (6, 2.0)]
    with pytest.raises(training_loop.NonFiniteError, match="^no checkpoint was written yet$"):
        training_loop.run(
            _state(), _step, _poisoned(after=0), start=0, steps=10, label="toy", log=None, log_every=2, nonfinite=guard
        )


def test_cloud_workdirs_stay_cloud_paths_and_local_ones_become_absolute(tmp_path, monkeypatch):
    assert str(training_loop.workdir_path("gs://bucket/run") / "checkpoints") == "gs://bucket/run/checkpoints"
    monkeypatch.chdir(tmp_path)
    assert str(training_loop.workdir_path("run")) == str(tmp_path / "run")
