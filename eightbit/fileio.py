"""Atomic file output: write to a temporary file beside the target, then rename over it.

Temporary files are named `.<target name>.<pid>-<random>.tmp`, so that the next write to the same target can
recognise the leftovers of a writer that was killed (its process is gone) and remove them, and nothing else.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path


def check_output_path(path: str | os.PathLike, overwrite: bool) -> Path:
    """Validate an output path before any slow work: it is not a directory, it is not silently replaced, and its
    folder exists and can be written to."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give the path of a file (inside it, or beside it)")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another path or pass overwrite=True (CLI: --force)")
    folder = path.parent
    if not folder.exists():
        raise FileNotFoundError(f"output folder {folder} does not exist; create it first")
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder, so {path} cannot be written")
    _check_writable(folder, path.name)
    return path


def _check_writable(folder: Path, name: str) -> None:
    """Create and remove a temporary file where the output will go: the only test that also holds for
    read-only mounts and access-control lists, which permission bits do not show."""
    try:
        fd, probe = _temp_file(folder, name)
    except OSError as exc:
        raise PermissionError(f"cannot write to {folder}: {exc.strerror or exc}; choose a writable folder") from exc
    os.close(fd)
    os.unlink(probe)


def _temp_file(folder: Path, name: str) -> tuple[int, str]:
    return tempfile.mkstemp(prefix=f".{name}.{os.getpid()}-", suffix=".tmp", dir=folder)


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; set it straight back
    os.umask(mask)
    return mask


def _leftover_pattern(name: str) -> re.Pattern:
    """Our temporary files for target `name` (mkstemp's random part: 8 of [a-z0-9_]); the group is the pid."""
    return re.compile(rf"\.{re.escape(name)}\.(\d+)-[a-z0-9_]{{8}}\.tmp")


def _process_is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_leftover_temp_files(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that killed writes to `path` left beside it (their process is gone); the
    temporary files of running writes and every other file are left alone.  Returns the removed paths."""
    path = Path(path)
    pattern = _leftover_pattern(path.name)
    removed = []
    for candidate in path.parent.iterdir():
        match = pattern.fullmatch(candidate.name)
        if match and candidate.is_file() and not _process_is_running(int(match.group(1))):
            with contextlib.suppress(FileNotFoundError):
                candidate.unlink()
                removed.append(candidate)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it replaces `path` in one rename.  On any
    failure the target is left as it was, and the temporary file is removed."""
    path = check_output_path(path, overwrite)
    remove_leftover_temp_files(path)
    fd, tmp = _temp_file(path.parent, path.name)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it owner-only; the output gets what open() would give it
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
