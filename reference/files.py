"""Every file the reference scripts write or read back: atomic writes, clear errors.

A write goes to a temporary file in the same directory and is renamed over the target only
when complete, so a reader (or a resumed run) sees the old file or the whole new one, never a
part; on failure the temporary file is removed. A full disk is reported as such, and the run
stays resumable. A checkpoint or cache that cannot be read back is reported in one line that
names the file and what to do, never as a bare unpickling traceback.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch


class FileProblem(RuntimeError):
    """A file could not be written or read back; the message names it and what to do."""


@contextlib.contextmanager
def atomic_path(path: Path, mode: int | None = 0o666):
    """Yield a temporary path next to ``path``; on success it replaces ``path``.

    ``mode``: the permissions the file gets (minus the umask), not the temporary file's 0600.
    """
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                         suffix=".tmp")  # fmt: skip
    os.close(handle)
    try:
        yield Path(temporary)
        if mode is not None:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(temporary, mode & ~umask)
        os.replace(temporary, path)
    except (OSError, RuntimeError) as error:
        _remove(temporary)
        # torch.save reports a full disk as RuntimeError("... file write failed")
        if getattr(error, "errno", None) == errno.ENOSPC or "write failed" in str(error):
            raise FileProblem(
                f"no space left on device while writing {path} ({error}); free some space and "
                "rerun with --resume (finished work is kept)"
            ) from None
        raise
    except BaseException:
        _remove(temporary)
        raise


def _remove(temporary) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(temporary)


def save(obj, path: Path) -> None:
    """``torch.save`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as temporary:
        torch.save(obj, temporary)


def write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) atomically: readers see the old file or the whole new one."""
    with atomic_path(path) as temporary:
        Path(temporary).write_text(text, encoding="utf-8")


def load(path: Path, **kwargs):
    """``torch.load`` of a checkpoint or cache this run wrote; a damaged one is a FileProblem."""
    try:
        return torch.load(path, weights_only=False, **kwargs)
    except RuntimeError as error:
        if "PytorchStreamReader" not in str(error) and "zip archive" not in str(error):
            raise  # not a damaged file (e.g. a CUDA checkpoint on a machine without CUDA)
        damaged = error
    except (EOFError, pickle.UnpicklingError, zipfile.BadZipFile, KeyError,
            ValueError) as error:  # fmt: skip
        damaged = error
    first = str(damaged).splitlines()[0] if str(damaged) else type(damaged).__name__
    raise FileProblem(
        f"{path} is damaged ({type(damaged).__name__}: {first[:120]}); delete it to redo that "
        "part, or rerun without --resume"
    ) from None
