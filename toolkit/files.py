"""Writes that never leave a half-written file or directory under the name readers look for, not
even after a machine crash: what is published is on disk (fsync) before the rename that publishes
it, and the rename is on disk (fsync of the parent directory) before the writer goes on."""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

AT_FDCWD = -100
RENAME_EXCHANGE = 2


@contextmanager
def replaced_dir(final: Path):
    """Yield a scratch directory beside `final`; when the block ends without error it becomes
    `final` (replacing an older one whole). After a crash only `<final>.tmp` is left."""
    tmp = scratch_dir(final)
    yield tmp
    publish_dir(tmp, final)


def tmp_name(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def scratch_dir(final: Path) -> Path:
    """An empty `<final>.tmp` to write `final`'s replacement into, then `publish_dir` it."""
    tmp = tmp_name(final)
    shutil.rmtree(tmp, ignore_errors=True)  # leftovers of an earlier crash while writing this very name
    old = final.with_name(final.name + ".old")
    if old.exists():  # a crash between publish_dir's two renames (no renameat2 here)
        if final.exists():
            shutil.rmtree(old)
        else:
            old.rename(final)  # the last complete version
    tmp.mkdir(parents=True)
    return tmp


def publish_dir(tmp: Path, final: Path) -> None:
    """`tmp`, complete, becomes `final`; an older `final` is replaced whole, with no moment
    where the name is missing (where the filesystem can swap two names)."""
    readable_as_umask_allows(tmp)
    fsync_tree(tmp)
    if final.exists() and _exchange(tmp, final):
        fsync(final.parent)
        shutil.rmtree(tmp)  # the old contents, now under the scratch name
        return
    # No atomic swap: set the old one aside, so a crash leaves it to scratch_dir to restore.
    old = final.with_name(final.name + ".old")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    fsync(final.parent)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def replaced_file(path: Path):
    """Yield a scratch file name beside `path`; when the block ends without error it becomes `path`."""
    tmp = tmp_name(path)
    yield tmp
    fsync(tmp)
    tmp.replace(path)
    fsync(path.parent)


def write_text(path: Path, text: str) -> None:
    with replaced_file(path) as tmp:
        tmp.write_text(text)


def pyplot():
    """matplotlib's pyplot, on its file-only backend (no display on training machines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_figure(fig, path: Path) -> None:
    """`fig` as a PNG at `path`, replaced whole; the figure is closed."""
    with replaced_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    pyplot().close(fig)


def fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to disk."""
    if os.name == "nt" and path.is_dir():
        return  # Windows cannot open a directory to flush it
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def readable_as_umask_allows(root: Path) -> None:
    """Every file under `root` readable by whom the process's umask lets read a new file: safetensors
    creates its files 0600, which keeps a model on a shared filesystem from the user's group."""
    umask = os.umask(0)
    os.umask(umask)  # (reading the umask means setting it)
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, os.stat(path).st_mode & 0o7777 | (0o444 & ~umask))


def fsync_tree(root: Path) -> None:
    """Every file under `root`, then each directory (its entries name those files)."""
    for folder, _, names in os.walk(root, topdown=False):
        for name in names:
            if not os.path.islink(os.path.join(folder, name)):  # a link's target is not ours to flush
                fsync(Path(folder, name))
        fsync(Path(folder))


@functools.cache
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        call = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    call.restype = ctypes.c_int
    return call


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing names in one step; False where the system or filesystem can't."""
    call = _renameat2()
    if call is None:
        return False
    if call(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS):  # a filesystem without RENAME_EXCHANGE, or an old kernel
        return False
    raise OSError(error, os.strerror(error), str(a), None, str(b))
