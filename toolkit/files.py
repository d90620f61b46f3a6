"""Writes that never leave a half-written file or directory under the name readers look for."""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replaced_dir(final: Path):
    """Yield a scratch directory beside `final`; when the block ends without error it becomes
    `final` (replacing an older one whole). After a crash only `<final>.tmp` is left."""
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # leftovers of an earlier crash while writing this very name
    tmp.mkdir(parents=True)
    yield tmp
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


@contextmanager
def replaced_file(path: Path):
    """Yield a scratch file name beside `path`; when the block ends without error it becomes `path`."""
    tmp = path.with_name(path.name + ".tmp")
    yield tmp
    tmp.replace(path)


def write_text(path: Path, text: str) -> None:
    with replaced_file(path) as tmp:
        tmp.write_text(text)
