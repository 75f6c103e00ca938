"""tpu/pod.sh --dry_run: the gcloud commands of a slice's life cycle are printed, none is run (gcloud is replaced by
a stub that fails), and a missing setting is one line with exit status 2."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "tpu" / "pod.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="tpu/pod.sh is a bash script")


def _pod(tmp_path, *args, **env):
    stub = tmp_path / "bin"
    stub.mkdir(exist_ok=True)
    (stub / "gcloud").write_text("#!/bin/sh\necho 'gcloud was run' >&2\nexit 99\n")
    (stub / "gcloud").chmod(0o755)
    environ = {"PATH": f"{stub}{os.pathsep}{os.environ['PATH']}", "TMPDIR": str(tmp_path), **env}
    return subprocess.run(["bash", str(SCRIPT), *args], env=environ, capture_output=True, text=True, timeout=60)


def test_dry_run_prints_every_command_and_runs_none(tmp_path):
    slice_ = dict(TPU="qf-test", ZONE="us-east5-a", ACCELERATOR="v5p-16", DATA_SRC="gs://bucket/data")
    printed = {}
    for command in ("create", "stage", "logs", "delete"):
        result = _pod(tmp_path, "--dry_run", command, **slice_)
        assert result.returncode == 0, result.stderr
        assert "gcloud was run" not in result.stderr
        printed[command] = result.stdout
    assert "queued-resources create qf-test --node-id qf-test --zone us-east5-a" in printed["create"]
    assert "--accelerator-type v5p-16 --runtime-version v2-alpha-tpuv5" in printed["create"]
    assert "tpu-vm scp" in printed["stage"] and "--worker=all" in printed["stage"]
    assert "gs://bucket/data" in printed["stage"]
    assert not (tmp_path / "qwen_flash_jax-qf-test.tar.gz").exists()  # git archive is printed, not run
    assert "queued-resources delete qf-test" in printed["delete"]

    launch = _pod(tmp_path, "--dry_run", "launch", "--", "--config=configs/5to5.py", "--workdir=gs://b/run", **slice_)
    assert launch.returncode == 0, launch.stderr
    assert "qwen_flash_jax.main\\ --distributed\\ --config=configs/5to5.py\\ --workdir=gs://b/run" in launch.stdout
    assert "worker-\\$\\(hostname\\).log" in launch.stdout


def test_missing_settings_are_one_line_with_status_2(tmp_path):
    missing_zone = _pod(tmp_path, "--dry_run", "create", TPU="qf-test")
    assert (missing_zone.returncode, missing_zone.stderr) == (2, "error: set ZONE (e.g. us-east5-a)\n")
    unknown = _pod(tmp_path, "--dry_run", "resize", TPU="qf-test", ZONE="z")
    assert unknown.returncode == 2 and unknown.stderr.startswith("usage: ")
