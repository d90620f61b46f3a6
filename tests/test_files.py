"""Publishing files and directories: on disk before they appear, and never a moment without them."""

import os
import shutil
import sys

import pytest

from toolkit import files


def tree(root, content: str):
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text(content)
    (root / "sub" / "b.txt").write_text(content)


def test_a_replaced_dir_is_swapped_in_with_no_moment_without_it(tmp_path, monkeypatch):
    final = tmp_path / "step-000004"
    tree(final, "old")
    seen = []

    def watch(name, original):
        def call(*args, **kwargs):
            seen.append((name, final.exists()))
            result = original(*args, **kwargs)
            seen.append((f"after {name}", final.exists()))
            return result
        return call

    monkeypatch.setattr(files, "_exchange", watch("exchange", files._exchange))
    monkeypatch.setattr(os, "rename", watch("rename", os.rename))
    monkeypatch.setattr(shutil, "rmtree", watch("rmtree", shutil.rmtree))
    with files.replaced_dir(final) as tmp:
        tree(tmp, "new")
    assert all(exists for _, exists in seen), seen
    if sys.platform.startswith("linux"):  # renameat2's exchange (ext4, xfs, btrfs, tmpfs)
        assert ("exchange", True) in seen and not any(name == "rename" for name, _ in seen), seen
    assert (final / "sub" / "b.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000004"]  # the old contents are gone


def test_without_an_exchange_the_old_dir_is_set_aside_then_deleted_or_restored(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)  # a filesystem without RENAME_EXCHANGE
    final = tmp_path / "out"
    tree(final, "old")
    with files.replaced_dir(final) as tmp:
        tree(tmp, "new")
    assert (final / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    final.rename(tmp_path / "out.old")  # a crash between the two renames: only the set-aside one is left
    files.scratch_dir(final)
    assert (final / "a.txt").read_text() == "new"  # the last complete one is back
    (tmp_path / "out.old").mkdir()  # a crash after the second rename: the set-aside one is stale
    files.scratch_dir(final)
    assert not (tmp_path / "out.old").exists() and (final / "a.txt").read_text() == "new"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads file descriptors' paths from /proc")
def test_everything_is_fsynced_before_it_is_published_and_the_parent_after(tmp_path, monkeypatch):
    events = []
    real_fsync = os.fsync

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def recorder(name, original):
        def call(a, b, *rest):
            events.append((name, str(b)))
            return original(a, b, *rest)
        return call

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", recorder("rename", os.rename))
    monkeypatch.setattr(os, "replace", recorder("rename", os.replace))
    final = tmp_path / "run" / "step-000002"
    tmp = str(final) + ".tmp"
    written = {("fsync", p) for p in (tmp, f"{tmp}/a.txt", f"{tmp}/sub", f"{tmp}/sub/b.txt")}

    with files.replaced_dir(final) as scratch:  # a new name: renamed into place
        tree(scratch, "x")
    assert set(events[:-2]) == written and len(events) == len(written) + 2
    assert events[-2:] == [("rename", str(final)), ("fsync", str(final.parent))]

    events.clear()
    monkeypatch.setattr(files, "_exchange", recorder("exchange", files._exchange))
    with files.replaced_dir(final) as scratch:  # an existing name: swapped
        tree(scratch, "y")
    assert set(events[:-2]) == written and len(events) == len(written) + 2
    assert events[-2:] == [("exchange", str(final)), ("fsync", str(final.parent))]

    events.clear()
    files.write_text(tmp_path / "summary.json", "{}")
    assert events == [("fsync", str(tmp_path / "summary.json.tmp")), ("rename", str(tmp_path / "summary.json")),
                      ("fsync", str(tmp_path))]


@pytest.mark.parametrize("umask, expected", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_published_files_are_readable_as_the_umask_allows(tmp_path, umask, expected):
    """safetensors writes its files 0600: a model published for a group must be readable by it."""
    import stat

    before = os.umask(umask)
    try:
        with files.replaced_dir(tmp_path / "final") as tmp:
            weights = tmp / "model.safetensors"
            weights.write_bytes(b"w")
            weights.chmod(0o600)
            (tmp / "sub").mkdir()
            (tmp / "sub" / "tokenizer.json").write_text("{}")
    finally:
        os.umask(before)
    for path in (tmp_path / "final" / "model.safetensors", tmp_path / "final" / "sub" / "tokenizer.json"):
        assert stat.S_IMODE(path.stat().st_mode) == expected, (path, oct(path.stat().st_mode))
