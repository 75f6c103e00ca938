"""atomic.publish: a file or directory appears whole or not at all, and no temporary entry is left behind."""

import pytest

from qwen_flash_jax import atomic


def _write_dir(path, text):
    path.mkdir()
    (path / "a.txt").write_text(text)


def _names(parent):
    return sorted(p.name for p in parent.iterdir())


def test_publishes_a_file_and_a_directory(tmp_path):
    with atomic.publish(tmp_path / "sub" / "f.txt") as tmp:
        assert not tmp.exists() and tmp.parent.parent == tmp_path / "sub"
        tmp.write_text("new")
    with atomic.publish(tmp_path / "d") as tmp:
        _write_dir(tmp, "new")
    assert (tmp_path / "sub" / "f.txt").read_text() == "new" and (tmp_path / "d" / "a.txt").read_text() == "new"
    assert _names(tmp_path) == ["d", "sub"] and _names(tmp_path / "sub") == ["f.txt"]


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_if_exists(tmp_path, kind):
    dest = tmp_path / "x"

    def write(tmp, text):
        if kind == "file":
            tmp.write_text(text)
        else:
            _write_dir(tmp, text)

    def read():
        return dest.read_text() if kind == "file" else "".join(p.read_text() for p in dest.iterdir())

    with atomic.publish(dest) as tmp:
        write(tmp, "old")
    with atomic.publish(dest, if_exists="keep") as tmp:
        write(tmp, "new")
    assert read() == "old"
    with pytest.raises(FileExistsError), atomic.publish(dest, if_exists="error") as tmp:
        write(tmp, "new")
    assert read() == "old"
    with atomic.publish(dest) as tmp:  # "replace", the default
        write(tmp, "new")
    assert read() == "new" and _names(tmp_path) == ["x"]


def test_a_failed_write_leaves_the_old_entry(tmp_path):
    dest = tmp_path / "d"
    with atomic.publish(dest) as tmp:
        _write_dir(tmp, "old")
    with pytest.raises(RuntimeError), atomic.publish(dest) as tmp:
        _write_dir(tmp, "half")
        raise RuntimeError("interrupted")
    with pytest.raises(FileNotFoundError), atomic.publish(tmp_path / "never"):
        pass  # nothing written
    assert (dest / "a.txt").read_text() == "old" and _names(tmp_path) == ["d"]


def test_rejects_an_unknown_policy(tmp_path):
    with pytest.raises(ValueError, match="if_exists"), atomic.publish(tmp_path / "x", if_exists="merge"):
        pass
