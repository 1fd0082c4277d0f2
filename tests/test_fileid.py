"""fileid.py: a path names the same file while its identity stays; a move, a replacement or a
deletion changes it.  Real files in tmp_path."""
import os

from argo_signals.fileid import file_identity, identity_of


def test_same_file_same_identity_even_after_writes(tmp_path):
    p = tmp_path / "a.db"
    p.write_bytes(b"one")
    before = file_identity(str(p))
    with open(p, "ab") as f:
        f.write(b"two")
    assert before is not None and file_identity(str(p)) == before == identity_of(os.stat(p))


def test_a_replaced_moved_or_deleted_file_changes_identity(tmp_path):
    p, other = tmp_path / "a.db", tmp_path / "b.db"
    p.write_bytes(b"old")
    other.write_bytes(b"new")
    old = file_identity(str(p))
    os.rename(p, tmp_path / "moved.db")            # moved away (still exists: no inode reuse)
    assert file_identity(str(p)) is None           # nothing at the path
    os.replace(other, p)                           # another file put in its place
    assert file_identity(str(p)) not in (None, old)
    assert file_identity(str(tmp_path / "moved.db")) == old
