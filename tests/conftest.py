"""Test-session setup: tiers, emulated devices, and the fixtures several test modules share.

Tiers (pytest markers, registered in pytest.ini): `parity` compares against torch/diffusers/transformers, `job` runs
whole jobs; every other test is the fast unit tier (`pytest -m "not parity and not job"`).

Devices: a test session runs on one CPU device. Emulating 8 devices makes every XLA:CPU program several times slower
on a small machine, so only tests marked `sharded` get them. JAX fixes its device count when it is first imported, so
those tests run in one child pytest process started with 8 emulated devices; the parent reports each of them with the
child's outcome. Setting QF_TEST_DEVICES=8 yourself runs them in place (e.g. `QF_TEST_DEVICES=8 pytest
tests/test_sharding.py`).

Parallel workers (pytest-xdist, `pytest -n 2`): run with `--dist loadgroup` (`pytest_configure` below sets it).
The session's temporary caches (compiled programs, toy assets) are made by the controlling process and shared by its
workers and every process they start; the `sharded` tests go to one worker, whose one child runs them; the tests of
a module that share a module-scoped fixture go to one worker, so that the fixture is built once.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import filelock
import pytest

DEVICES_ENV = "QF_TEST_DEVICES"  # set: this process emulates that many CPU devices and runs `sharded` tests itself
REPORT_ENV = "QF_TEST_REPORT"  # set (in the child): append every test phase's outcome to this JSON-lines file
TOY_CACHE_ENV = "QF_TEST_TOY_CACHE"  # the parent's toy cache, so that the child trains no toy asset again
JAX_CACHE_ENV = "QF_TEST_JAX_CACHE"
TOY_CACHE_BUILT = "built-for-the-tests"  # in the toy cache: its shared assets are complete
SHARDED_DEVICES = 8


def cpu_device_flags(devices):
    """XLA_FLAGS for `devices` emulated CPU devices.

    XLA:CPU aborts the process (SIGABRT) when a device's thread reaches a collective over 60 s after the others (20 s
    warning + 40 s). Emulated devices on a busy 2-core CI machine can lag that much: one CI run died so. A lag is not
    a bug here, so the tests wait up to 30 min, and warn only after 2.
    """
    return (
        f"--xla_force_host_platform_device_count={devices} "
        "--xla_cpu_collective_call_warn_stuck_timeout_seconds=120 "
        "--xla_cpu_collective_call_terminate_timeout_seconds=1800"
    )


# The suite's time is mostly XLA:CPU compiling small programs that then run a few steps: LLVM's optimisation
# passes cost more than they save there. Without them a compile-bound distillation test takes 0.6x the time, a
# run-bound one (the judge's training) 1.1x (docs/experiments/test_times.md). The numerics are the HLO's, so exact
# comparisons within the suite still hold; subprocesses inherit the flag. An XLA_FLAGS that sets the level wins.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
if os.environ.get(DEVICES_ENV):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " " + cpu_device_flags(int(os.environ[DEVICES_ENV]))
    ).strip()

# The test extra installs libtpu (tests/test_aot.py compiles for TPU slices through it); left to choose, jax would
# try to start a TPU backend on every CPU-only machine and print its start-up errors. Tests run on CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Identical programs compiled by several tests (the same tiny model in a fresh run, a resumed run, a command-line
# subprocess ...) are compiled once per session: a persistent compilation cache in a per-session temporary
# directory. It is set through jax's environment variables, before jax is imported, so that every process the
# session starts (the `sharded` child, the CLI subprocesses, the kill and multi-process workers) reads and writes
# the same cache. Every program is cached, however quick to compile: on a 2-core machine the many small ones add up.
# A cached executable is the compiled program itself, so results are bit-identical with or without it (the
# resume-equals-uninterrupted tests compare runs that compiled with ones that loaded from the cache).
_OWN_TEMPORARIES = []  # made by this process (not inherited from a parent session): removed when it ends
if not os.environ.get(JAX_CACHE_ENV):
    os.environ[JAX_CACHE_ENV] = tempfile.mkdtemp(prefix="qf-jax-cache-")
    _OWN_TEMPORARIES.append(os.environ[JAX_CACHE_ENV])
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ[JAX_CACHE_ENV]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
# The toy assets several job tests train on (dataset, text encoder, teachers) live in one per-session directory too,
# made here for the same reason: the `sharded` child and parallel workers (pytest-xdist) read the same one.
if not os.environ.get(TOY_CACHE_ENV):
    os.environ[TOY_CACHE_ENV] = tempfile.mkdtemp(prefix="qf-toy-cache-")
    _OWN_TEMPORARIES.append(os.environ[TOY_CACHE_ENV])
import jax  # noqa: E402  (after XLA_FLAGS: the device count is fixed at import)

if jax.config.jax_compilation_cache_dir != os.environ[JAX_CACHE_ENV]:  # jax was imported before this file
    jax.config.update("jax_compilation_cache_dir", os.environ[JAX_CACHE_ENV])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

from qwen_flash_jax.train import components  # noqa: E402
from tests import helpers  # noqa: E402


@pytest.fixture(scope="session")
def toy_cache():
    """One cache of tiny toy assets (dataset, text encoder, teachers, judge) shared by the end-to-end tests.

    Under parallel workers, the first worker to ask builds the dataset, the text encoder and the distillation's
    teachers while the others wait: a cached teacher is trained by one run at a time, and a second run that asks for
    it meanwhile stops with an error (train/teacher.py) rather than wait."""
    path = pathlib.Path(os.environ[TOY_CACHE_ENV])
    if os.environ.get("PYTEST_XDIST_WORKER"):  # also in the `sharded` child of a worker
        _build_toy_cache(path)
    return path


def _build_toy_cache(path: pathlib.Path):
    with filelock.FileLock(str(path) + ".lock"):
        if not (path / TOY_CACHE_BUILT).exists():
            components.build(helpers.tiny_distill_config(path), log=lambda *_: None)
            (path / TOY_CACHE_BUILT).touch()


@pytest.fixture(scope="session")
def tiny_teachers():
    """A tiny random transformer, two teachers' parameters, conditioning and a noisy sample (tests/helpers.py), built
    once for every module that reads them (immutable arrays: no test can change them for another)."""
    return helpers.tiny_teachers()


@pytest.fixture
def cpu_devices_env():
    """`cpu_devices_env(n)`: this process's environment for a subprocess with `n` emulated CPU devices."""

    def env(devices):
        flags = " ".join(
            f
            for f in os.environ.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")
        )
        return dict(os.environ, XLA_FLAGS=f"{flags} {cpu_device_flags(devices)}".strip(), JAX_PLATFORMS="cpu")

    return env


# ---- `sharded` tests: run in one child process with 8 emulated devices ----


def _in_place():
    return bool(os.environ.get(DEVICES_ENV))


class ShardedRun(pytest.Item):
    """A `sharded` test of this pytest run, run by the child process; reports the child's outcome as its own."""

    def __init__(self, *, original, batch, **kwargs):
        super().__init__(**kwargs)
        self.original, self.batch = original, batch
        self.own_markers = list(original.own_markers)
        self.keywords.update(original.keywords)

    def runtest(self):
        phases = self.batch.outcomes()
        mine = phases.get(self.original.nodeid)  # a worker's nodeid has its `@group` (pytest_collection_modifyitems)
        if mine is None:
            raise ShardedFailure(
                f"the child run with {SHARDED_DEVICES} devices reported nothing for this test:\n"
                + self.batch.log_tail()
            )
        for phase in mine:
            if phase["outcome"] == "failed":
                raise ShardedFailure(f"[{phase['when']}, {SHARDED_DEVICES} emulated devices]\n{phase['text']}")
        skipped = [p for p in mine if p["outcome"] == "skipped"]
        if skipped:
            pytest.skip(skipped[0]["text"].removeprefix("Skipped: "))

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, ShardedFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.original.reportinfo()


class ShardedFailure(Exception):
    pass


class ShardedBatch:
    """The session's `sharded` tests, run once in one child pytest process when the first of them comes up."""

    def __init__(self, rootpath):
        self.rootpath, self.nodeids, self._outcomes, self._log = rootpath, [], None, None
        self.needs_toy_cache = False
        self.xdist = (
            False  # pytest-xdist is loaded: the child runs without workers (`-n 0`) whatever PYTEST_ADDOPTS says
        )

    def outcomes(self):
        if self._outcomes is None:
            self._outcomes = self._run()
        return self._outcomes

    def _run(self):
        if os.environ.get("PYTEST_XDIST_WORKER") and self.needs_toy_cache:
            # The scheduler hands this group out first (the largest), before any toy asset exists: built here on one
            # device, rather than by the child on 8 emulated ones, several times slower. (In one process the
            # `sharded` tests run last, after the other tests built the assets.)
            _build_toy_cache(pathlib.Path(os.environ[TOY_CACHE_ENV]))
        tmp = tempfile.mkdtemp(prefix="qf-sharded-")
        _OWN_TEMPORARIES.append(tmp)
        report, self._log = os.path.join(tmp, "report.jsonl"), os.path.join(tmp, "log.txt")
        env = dict(os.environ, **{DEVICES_ENV: str(SHARDED_DEVICES), REPORT_ENV: report})
        with open(self._log, "w") as log:
            try:
                subprocess.run(
                    [
                        *(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"),
                        *(("-n", "0") if self.xdist else ()),
                        *self.nodeids,
                    ],
                    cwd=self.rootpath,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=3600,
                )
            except subprocess.TimeoutExpired:  # the tests it did not finish fail with this log's tail
                log.write("\nthe child pytest was stopped after 3600 s\n")
        phases = {}
        if os.path.exists(report):
            with open(report) as f:
                for line in f:
                    entry = json.loads(line)
                    phases.setdefault(entry["nodeid"], []).append(entry)
        return phases

    def log_tail(self):
        if self._log is None or not os.path.exists(self._log):
            return "(no output)"
        with open(self._log) as f:
            return f.read()[-6000:]


@pytest.hookimpl(trylast=True)  # after -m / -k / --deselect: only the selected tests go to the child
def pytest_collection_modifyitems(session, config, items):
    """Moves the `sharded` tests to the end of the session, so that their child reuses the toy assets that the other
    tests made on one device, rather than training them on 8 slower ones."""
    if _in_place():
        return
    batch = ShardedBatch(config.rootpath)
    sharded = [item for item in items if item.get_closest_marker("sharded") is not None]
    batch.nodeids = [item.nodeid for item in sharded]
    batch.needs_toy_cache = any("toy_cache" in _fixture_names(item) for item in sharded)
    batch.xdist = config.pluginmanager.hasplugin("xdist")
    items[:] = [item for item in items if item.get_closest_marker("sharded") is None] + [
        ShardedRun.from_parent(item.parent, name=item.name, original=item, batch=batch) for item in sharded
    ]
    if hasattr(config, "workerinput"):  # a pytest-xdist worker: the controller schedules by the nodeids' `@group`
        # xdist hands out the groups largest first, then single tests in collection order: the `job` tests (whole
        # runs, up to minutes each) go before the quick ones, so that the session does not end on one worker
        # finishing a long run while the other has nothing left.
        items.sort(key=lambda item: item.get_closest_marker("job") is None)
        for item in items:
            group = _worker_group(item)
            if group:
                _add_worker_group(item, group)


def _add_worker_group(item, group):
    """Appends `@group` to the item's nodeid, which is all that xdist's `loadgroup` scheduler reads. pytest keeps the
    nodeid in `_nodeid` up to 9.1 and as a parsed NodeId in `_id` from 9.2 (where xdist 3.8's own `xdist_group`
    marker silently stops grouping); a pytest that stores it elsewhere stops the session rather than run ungrouped
    (each worker would then start its own `sharded` child and build the module fixtures again)."""
    nodeid = f"{item.nodeid}@{group}"
    if isinstance(getattr(item, "_id", None), str) or not hasattr(item, "_id"):
        item._nodeid = nodeid
    else:
        item._id = type(item._id).parse(nodeid)
    if item.nodeid != nodeid:
        raise pytest.UsageError(f"this pytest does not let tests/conftest.py group {item.nodeid} onto one worker")


def _fixture_names(item):
    fixtures = getattr(item, "_fixtureinfo", None)
    return () if fixtures is None else fixtures.names_closure


def _worker_group(item):
    """The group of tests that must run on one worker: every `sharded` test (one child runs them all); the tests of
    a module that share a module-scoped fixture (built once per worker). The toy assets need no group: the first
    worker to ask builds them under a file lock (`toy_cache`), so a module's other tests spread over the workers."""
    if isinstance(item, ShardedRun):
        return "sharded"
    fixtures = getattr(item, "_fixtureinfo", None)
    if fixtures is None:
        return None
    if any(defs[-1].scope == "module" for defs in fixtures.name2fixturedefs.values()):
        return item.module.__name__
    return None


def pytest_configure(config):
    """Under pytest-xdist, `--dist load` (what `-n` alone means) becomes `loadgroup`: the groups made by
    `pytest_collection_modifyitems` then each run on one worker."""
    if getattr(config.option, "dist", "no") == "load":
        config.option.dist = "loadgroup"


def pytest_runtest_logreport(report):
    path = os.environ.get(REPORT_ENV)
    if not path or (report.when != "call" and report.outcome == "passed"):
        return
    text = report.longreprtext
    if report.skipped and isinstance(report.longrepr, tuple):
        text = report.longrepr[2]  # (file, line, reason)
    with open(path, "a") as f:
        f.write(
            json.dumps({"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome, "text": text}) + "\n"
        )


def pytest_unconfigure(config):
    for path in _OWN_TEMPORARIES:
        shutil.rmtree(path, ignore_errors=True)
