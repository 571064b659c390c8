"""Atomic file and folder writes: a temp path next to the target, then one rename.

An interrupted write (exception, Ctrl-C, kill) leaves the previous file or nothing at the target path,
never a half-written artifact.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from ..errors import BadArgumentError


def _check_parent(path: str) -> str:
    """The existing, writable folder ``path`` goes in (BadArgumentError otherwise)."""
    if not path:
        raise BadArgumentError("cannot write: expected a path, found an empty one")
    parent = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(parent):
        raise BadArgumentError(f"cannot write {path}: expected an existing folder {parent}, found none")
    if not os.access(parent, os.W_OK):
        raise BadArgumentError(f"cannot write {path}: folder {parent} is not writable")
    return parent


def check_file_path(path: str) -> str:
    """``_check_parent`` for a file about to be written: a folder (one that exists, or a path ending in a separator)
    is refused by name instead of failing later on a temp file's name."""
    if path and os.path.isdir(path):
        raise BadArgumentError(f"cannot write {path}: expected a file path, found a folder")
    if path and path.endswith((os.sep, "/")):
        raise BadArgumentError(f"cannot write {path}: expected a file path, found a path ending in a separator")
    parent = _check_parent(path)
    _probe(path, parent)
    return parent


def _probe(path: str, parent: str) -> None:
    """What os.access cannot tell (root passes it everywhere): a file can be made in ``parent`` (no /proc, no
    read-only mount), and the name is one the filesystem takes, before any work whose result would be lost."""
    try:
        limit = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    if len(os.fsencode(os.path.basename(path))) > limit:
        raise BadArgumentError(f"cannot write {path}: expected a file name of at most {limit} bytes, found "
                               f"{len(os.fsencode(os.path.basename(path)))}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=parent)
    except OSError as e:
        raise BadArgumentError(f"cannot write {path}: no file can be made in {parent} ({e.strerror or e})") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.remove(probe)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def usual_permissions(path: str, mode: int) -> None:
    """mkstemp / mkdtemp create private (0600 / 0700) entries: give the result the usual permissions."""
    os.chmod(path, mode & ~_umask())


def _short(name: str) -> str:
    """``name``'s first 64 bytes (a filesystem counts bytes: 64 characters of emoji are 256)."""
    return os.fsdecode(os.fsencode(name)[:64])


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ""):
    """Yield a temp file path; on success it is renamed onto ``path``, on failure removed."""
    parent = check_file_path(path)
    # (the name cut short in the temp prefix: a legal 255-byte name plus ".tmp-" and mkstemp's letters is not)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + _short(os.path.basename(path)) + "-", suffix=suffix, dir=parent)
    os.close(fd)
    try:
        yield tmp
        usual_permissions(tmp, 0o666)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str):
    """Yield a temp folder; on success it replaces ``path`` (an old folder there is removed last)."""
    parent = _check_parent(path)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + _short(os.path.basename(os.path.normpath(path))) + "-", dir=parent)
    old = None
    try:
        yield tmp
        usual_permissions(tmp, 0o777)
        for root, dirs, files in os.walk(tmp):
            for d in dirs:
                usual_permissions(os.path.join(root, d), 0o777)
            for f in files:
                usual_permissions(os.path.join(root, f), 0o666)
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=".old-", dir=parent)
            os.replace(path, os.path.join(old, "x"))
        os.replace(tmp, path)
    except BaseException:
        # (interrupted between the two renames: the previous folder goes back where it was)
        if old is not None and os.path.exists(os.path.join(old, "x")) and not os.path.exists(path):
            os.replace(os.path.join(old, "x"), path)
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
