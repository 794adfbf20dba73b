"""store.Trash: removal by rename now, deletion in the background."""

from __future__ import annotations

import os

from pycri import store


def _tree(path: str) -> None:
    os.makedirs(os.path.join(path, "a", "b"))
    with open(os.path.join(path, "a", "b", "f"), "w") as f:
        f.write("x" * 10000)


def test_put_takes_the_tree_away_at_once_and_deletes_it(tmp_path):
    t = store.Trash(str(tmp_path))
    victim = str(tmp_path / "victim")
    _tree(victim)
    t.put(victim)
    assert not os.path.exists(victim)
    assert t.drain(10)
    assert os.listdir(t.dir) == []


def test_put_of_a_missing_path_is_fine(tmp_path):
    t = store.Trash(str(tmp_path))
    t.put(str(tmp_path / "nothing-here"))
    assert t.drain(10)
    assert os.listdir(t.dir) == []


def test_leftovers_of_a_killed_process_are_deleted_by_the_next_trash(tmp_path):
    # what a process killed before its deleter ran leaves behind
    _tree(str(tmp_path / "trash" / "c1.0000"))
    _tree(str(tmp_path / "trash" / "c2.0000"))
    t = store.Trash(str(tmp_path))
    assert t.drain(10)
    assert os.listdir(t.dir) == []


def test_same_name_twice_does_not_collide(tmp_path):
    t = store.Trash(str(tmp_path))
    for _ in range(3):
        _tree(str(tmp_path / "same"))
        t.put(str(tmp_path / "same"))
        assert not os.path.exists(tmp_path / "same")
    assert t.drain(10)
    assert os.listdir(t.dir) == []


def test_trash_deletes_trees_without_following_links(tmp_path):
    """The trash thread's rm -rf (in C) removes a tree with nested dirs and files
    but never what a symlink in it points to; a missing path is fine."""
    from pycri import _native
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "x").write_text("stays")
    t = tmp_path / "t"
    (t / "a" / "b" / "c").mkdir(parents=True)
    (t / "a" / "f").write_text("goes")
    (t / "a" / "ro").mkdir(mode=0o500)
    (t / "to-keep").symlink_to(keep)
    (t / "a" / "to-x").symlink_to(keep / "x")
    trash = store.Trash(str(tmp_path / "base"))
    trash.put(str(t))
    assert store.Trash.drain(10)
    assert not t.exists() and os.listdir(trash.dir) == []
    assert (keep / "x").read_text() == "stays"
    _native.remove_tree(str(tmp_path / "missing"))
