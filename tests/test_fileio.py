"""Atomic outputs: refused before any work when they cannot succeed, never a half-written or replaced user file,
and no hidden temporary files left behind by a killed write."""

import os
import subprocess
import sys
import textwrap
import time

import pytest

from eightbit import fileio
from eightbit.fileio import atomic_path, check_output_path


def test_a_failed_write_leaves_the_existing_file_byte_identical(tmp_path):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"precious")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target, overwrite=True) as tmp:
        tmp.write_bytes(b"half a model")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_an_existing_directory_is_refused_even_with_overwrite(tmp_path):
    target = tmp_path / "model.onnx"
    target.mkdir()
    (target / "inside").write_text("keep")
    for overwrite in (False, True):
        with pytest.raises(IsADirectoryError, match="is a directory"):
            check_output_path(target, overwrite)
        with pytest.raises(IsADirectoryError), atomic_path(target, overwrite):
            pytest.fail("atomic_path yielded for a directory")
    assert (target / "inside").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def _read_only_folder(tmp_path):
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o500)
    if os.access(folder, os.W_OK):  # root writes anywhere: use a place no one can create files in
        folder.chmod(0o700)
        folder = "/sys"
        if not os.path.isdir(folder) or _can_create_in(folder):
            pytest.skip("no read-only folder available to this user")
    return folder


def _can_create_in(folder) -> bool:
    try:
        with atomic_path(os.path.join(folder, "eightbit_probe.tmp")) as tmp:
            tmp.write_bytes(b"")
    except OSError:
        return False
    os.unlink(os.path.join(folder, "eightbit_probe.tmp"))
    return True


def test_a_read_only_folder_is_refused_before_any_work(tmp_path):
    folder = _read_only_folder(tmp_path)
    with pytest.raises(PermissionError, match="cannot write"):
        check_output_path(os.path.join(folder, "m.onnx"), overwrite=False)


_KILLED_WRITER = """
import importlib.util, os, signal, sys
spec = importlib.util.spec_from_file_location("fileio", {fileio!r})  # without eightbit's heavy imports
fileio = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fileio)
atomic_path = fileio.atomic_path
with atomic_path(sys.argv[1], overwrite=True) as tmp:
    tmp.write_bytes(b"half a model")
    {action}
"""


def _writer(target, action: str) -> subprocess.Popen:
    code = textwrap.dedent(_KILLED_WRITER.format(action=action, fileio=fileio.__file__))
    return subprocess.Popen([sys.executable, "-c", code, str(target)], stdin=subprocess.PIPE)


def test_temporary_files_of_a_killed_write_are_removed_on_the_next_write(tmp_path):
    target = tmp_path / "m.onnx"
    _writer(target, "os.kill(os.getpid(), signal.SIGKILL)").wait()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".m.onnx.")  # what a killed export leaves today
    others = [".other.onnx.abcd1234.tmp", ".m.onnx.keep", "m.onnx.tmp", "notes.tmp", ".m.onnx.d.onnx.abcd1234.tmp"]
    for name in others:
        (tmp_path / name).write_bytes(b"not ours")
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"model")
    assert target.read_bytes() == b"model"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.onnx", *others])
    assert all((tmp_path / name).read_bytes() == b"not ours" for name in others)


def test_the_temporary_file_of_a_running_write_is_left_alone(tmp_path):
    target = tmp_path / "m.onnx"
    running = _writer(target, "sys.stdin.read()")  # holds its temporary file until stdin closes
    try:
        deadline = time.monotonic() + 60
        while not any(tmp_path.iterdir()) and running.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        (theirs,) = list(tmp_path.iterdir())
        with atomic_path(tmp_path / "m.onnx", overwrite=True) as tmp:
            tmp.write_bytes(b"mine")
        assert theirs.exists()
    finally:
        running.communicate(b"", timeout=60)
    assert running.returncode == 0 and target.read_bytes() == b"half a model"


def test_atomic_outputs_get_the_usual_permissions_not_mkstemps_0600(tmp_path):
    """An output written through atomic_path is readable by others as any file the user creates (umask), not the
    owner-only 0600 of the temporary file it was renamed from."""
    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "model.onnx") as tmp:
            tmp.write_bytes(b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "model.onnx").stat().st_mode & 0o777 == 0o644
