"""lora_core.common: writes are atomic and leave ordinary modes; progress is visible in a log."""
import os
import stat

import pytest

from lora_core.common.files import (atomic_directory, atomic_write_json, atomic_write_text, atomic_write_via,
                                    read_json)
from lora_core.common.progress import progress


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_files_and_directories_get_the_modes_open_and_mkdir_would_give(tmp_path, umask_022):
    f = atomic_write_text(tmp_path / "a" / "x.txt", "hello")
    assert f.read_text() == "hello" and _mode(f) == 0o644, oct(_mode(f))
    with atomic_directory(tmp_path / "run") as d:
        (d / "sub").mkdir()
        (d / "sub" / "w.bin").write_bytes(b"\0" * 10)
        (d / "c.json").write_text("{}")
    out = tmp_path / "run"
    assert _mode(out) == 0o755 and _mode(out / "sub") == 0o755
    assert _mode(out / "sub" / "w.bin") == 0o644 and _mode(out / "c.json") == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "run"], "no temporary left behind"


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = atomic_write_json(tmp_path / "r.json", {"v": 1})

    def broken(tmp):
        tmp.write_text('{"v": 2')  # half a file, then the writer dies
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_via(target, broken)
    assert read_json(target) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_a_directory_is_replaced_whole_or_not_at_all(tmp_path):
    out = tmp_path / "ckpt"
    with atomic_directory(out) as d:
        (d / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as d:
            (d / "new.txt").write_text("new")
            raise RuntimeError("killed mid-write")
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    with atomic_directory(out) as d:
        (d / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    with pytest.raises(FileExistsError, match="not empty"):
        with atomic_directory(out, overwrite=False):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_read_json_names_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        read_json(bad)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        read_json(tmp_path / "missing.json")


def test_progress_off_a_terminal_prints_plain_lines(capsys):
    # Under pytest stderr is not a terminal: the bar gives way to status lines.
    bar = progress(total=3, desc="train", every_s=0.0)
    bar.update(1)
    bar.set_postfix(loss="1.25")
    bar.update(2)
    bar.close()
    err = capsys.readouterr().err
    assert "train: 1/3" in err and "train: 3/3 (loss=1.25)" in err and "\r" not in err
    assert list(progress(range(4), desc="items", every_s=1e9)) == [0, 1, 2, 3]
    assert capsys.readouterr().err == "items: 4/4\n", "a line at the end even when no interval passed"
    list(progress(range(3), desc="quiet", enabled=False))
    assert capsys.readouterr().err == ""
