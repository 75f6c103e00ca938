"""The training loop every job that trains runs: the teachers, the distillation, the toy judge and the toy text
encoder's pretraining.

A job supplies its state, its step function `step_fn(state, batch) -> (state, metrics)` (jitted, or a thin wrapper
around jitted calls), its batch iterator (one item per step) and its callbacks; `run` owns the rest:

- logging: every `log_every` steps and at the last, the metrics of the steps since the last log are fetched (the
  loop's only host sync), averaged over the steps that report each of them, written to the clu metric writer,
  appended to `history` and logged as one console line with the elapsed time;
- the non-finite guard: at a log step, a run of `nonfinite.limit` steps counted by the state stops the job with a
  `NonFiniteError` naming the last good checkpoint;
- probes: a callback every `probe_every` steps (and at step 0 of a fresh run);
- checkpoints: `Checkpointer` saves state, data-iterator state and metadata at orbax's fixed save interval and
  after the last step; `stop_at` ends the run early after that step, as a preemption would.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from qwen_flash_jax.models.config import ConfigError

if TYPE_CHECKING:
    # clu's metric writers and progress reports import TensorFlow (~3 s): they are imported where a run writes
    # TensorBoard events, so the CLIs and tests that never do (generate, export, aot, ...) start without it and a
    # machine without TensorFlow can run the steps.
    from clu import metric_writers


def workdir_path(path) -> epath.Path:
    """A job's directory as an `epath.Path`: a cloud one (gs://...) stays as it is, a local one is made absolute."""
    if "://" in str(path):
        return epath.Path(path)
    return epath.Path(pathlib.Path(path).absolute())


class NonFiniteError(RuntimeError):
    """A run of consecutive steps had non-finite losses or gradients."""


class Checkpointer:
    """Orbax checkpoints of a training run: train state (pytree), data-iterator state and metadata, saved together.

    `CheckpointManager` writes each step into a temporary directory and renames it when every item is complete
    (atomic commit), asynchronously; a job killed mid-save leaves only a temporary directory that is ignored and
    cleaned up, so the rerun resumes from the last complete step. Saves happen at orbax's fixed interval (`every`;
    0 saves only when forced)."""

    def __init__(self, directory, *, keep: int = 2, every: int = 100, async_save: bool = True):
        self.directory = workdir_path(directory)
        self.every = int(every)
        # Only the fixed interval: orbax's default policy would also save the first step of a fresh run.
        policy = (
            ocp.checkpoint_managers.FixedIntervalPolicy(self.every)
            if self.every > 0
            else ocp.checkpoint_managers.SpecificStepsPolicy(())
        )
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
            save_decision_policy=policy,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def maybe_save(self, step: int, state, iterator, meta: dict, *, force: bool = False) -> bool:
        """Saves when the save interval says so (or when forced, unless `step` is saved already); the iterator's
        state is read only when saving."""
        if not self._manager.should_save(step) and not (force and self._manager.latest_step() != step):
            return False
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(iterator.get_state()),
                meta=ocp.args.JsonSave(meta),
            ),
            force=force,
        )

    def restore(self, abstract_state, step: int | None = None):
        """(state, data_state, meta) of `step` (default: the latest complete one), or None if there is none."""
        step = self._manager.latest_step() if step is None else step
        if step is None:
            return None
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore(),
                ),
            )
        except ValueError as e:
            if "do not match" not in str(e) and "mismatch" not in str(e):
                raise
            # A workdir from another version of the code (or another config): resuming it would be wrong.
            raise ConfigError(
                f"the checkpoint at step {step} in {self.directory} holds a different train state than this run "
                "builds (written by another version of the code or a different config); use a new --workdir, "
                "or delete that directory to start over"
            ) from None
        return restored["state"], restored["data"], restored["meta"]

    def wait(self):
        self._manager.wait_until_finished()

    def close(self):
        self._manager.wait_until_finished()
        self._manager.close()


def metric_writer(logdir) -> metric_writers.MetricWriter:
    """The clu writer of a job's `logdir` (TensorBoard events; only process 0 writes)."""
    from clu import metric_writers  # imports TensorFlow: only when a run writes events (see the top)

    return metric_writers.create_default_writer(str(logdir), just_logging=jax.process_index() > 0)


def mean_metrics(pending: Sequence[dict], sums: Sequence[str] = ()) -> dict[str, float]:
    """The fetched metrics of an interval: each key's mean over the steps that report it (in the order keys first
    appear), or its total for the keys in `sums`."""
    fetched = jax.device_get(list(pending))
    keys = dict.fromkeys(k for m in fetched for k in m)
    return {
        k: float(sum(float(m[k]) for m in fetched if k in m))
        if k in sums
        else float(np.mean([float(m[k]) for m in fetched if k in m]))
        for k in keys
    }


@dataclasses.dataclass(frozen=True)
class NonFiniteGuard:
    """Stops a run when the state's count of consecutive non-finite steps (`count(state)`, logged as `key`) reaches
    `limit` at a log step."""

    count: Callable[[Any], Any]
    limit: int
    key: str = "nonfinite_run"


def run(
    state,
    step_fn: Callable[[Any, Any], tuple[Any, dict]],
    batches: Iterable,
    *,
    start: int,
    steps: int,
    label: str,
    log: Callable[[str], None] | None = print,
    log_every: int = 0,
    writer: metric_writers.MetricWriter | None = None,
    history: list | None = None,
    sums: Sequence[str] = (),
    nonfinite: NonFiniteGuard | None = None,
    probe: Callable[[int, Any], None] | None = None,
    probe_every: int = 0,
    checkpointer: Checkpointer | None = None,
    data_iterator=None,
    stop_at: int | None = None,
):
    """Runs steps `start`..`steps - 1` of a job; returns (state, finished): `finished` is False when `stop_at` ended
    the run early. `batches` yields one item per step; `data_iterator` (whose `get_state` the checkpoint saves) is
    the stream `batches` draws from. The checkpointer is closed on return. Metrics are fetched only when something
    consumes them (`log`, `writer`, `history` or the guard) and `log_every` > 0."""
    logging_on = log_every > 0 and any(x is not None for x in (log, writer, history, nonfinite))
    progress = None
    if writer is not None and log_every > 0:
        from clu import periodic_actions  # imports TensorFlow: only with a writer (see the top)

        progress = periodic_actions.ReportProgress(num_train_steps=steps, writer=writer, every_steps=log_every)
    if probe is not None and start == 0:
        probe(0, state)
    batches = iter(batches)
    pending, started = [], time.perf_counter()
    for step in range(start, steps):
        state, metrics = step_fn(state, next(batches))
        if logging_on:
            pending.append(metrics)
        done = step + 1
        if progress is not None:
            progress(done)
        if logging_on and (done % log_every == 0 or done == steps):
            summary = mean_metrics(pending, sums)
            pending = []
            if nonfinite is not None:
                summary[nonfinite.key] = float(jax.device_get(nonfinite.count(state)))
            if writer is not None:
                writer.write_scalars(done, summary)
            if history is not None:
                history.append((done, summary))
            if log is not None:
                log(
                    f"{label} step {done}/{steps}: "
                    + ", ".join(f"{k} {v:.4f}" for k, v in summary.items())
                    + f" ({time.perf_counter() - started:.0f}s)"
                )
            if nonfinite is not None and summary[nonfinite.key] >= nonfinite.limit:
                last = None
                if checkpointer is not None:
                    checkpointer.close()
                    last = checkpointer.latest_step()
                raise NonFiniteError(
                    f"{int(summary[nonfinite.key])} consecutive steps had non-finite losses or gradients; "
                    f"stopping. Last good checkpoint: step {last} in {checkpointer.directory}"
                    if last is not None
                    else "no checkpoint was written yet"
                )
        if probe is not None and probe_every > 0 and done % probe_every == 0:
            probe(done, state)
        if checkpointer is not None:
            checkpointer.maybe_save(done, state, data_iterator, {"step": done}, force=done == steps)
        if stop_at is not None and stop_at <= done < steps:
            if checkpointer is not None:
                checkpointer.close()
            return state, False
    if checkpointer is not None:
        checkpointer.close()
    return state, True
