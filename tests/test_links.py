"""The two node links behind one declared interface: LocalLink and SshLink offer
everything Link declares, and move a folder tree to a node and back alike, byte
for byte, listing links and special files without following them.  The SSH link
is a real one, through a loopback jump host to a loopback sshd."""
import hashlib
import os
import sys
from pathlib import Path

import pytest
import yaml

from sshcluster import Cluster

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import gpuqueue  # noqa: E402


def test_both_links_offer_everything_a_link_declares():
    for cls in (gpuqueue.LocalLink, gpuqueue.SshLink):
        assert issubclass(cls, gpuqueue.Link) and not cls.__abstractmethods__, cls
    assert {"list_tree", "fetch_tree", "put_tree"} <= set(dir(gpuqueue.Link))

    class Half(gpuqueue.Link):  # a link that forgot the folder-tree primitives
        pass
    with pytest.raises(TypeError):
        Half()


def project(root):
    """A small project: a package, a data file of 300 kB, an empty folder, and a
    symbolic link that put_tree must leave behind."""
    root.mkdir()
    (root / "main.py").write_text("import pkg\nprint(pkg.VALUE)\n")
    (root / "pkg").mkdir()
    (root / "pkg" / "__init__.py").write_text("VALUE = 42\n")
    (root / "pkg" / "data").mkdir()
    (root / "pkg" / "data" / "blob.bin").write_bytes(os.urandom(300_000))
    (root / "empty").mkdir()
    os.symlink("/etc/passwd", root / "passwd")
    return root


def digests(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file() and not p.is_symlink()}


def round_trip(link, on_node, tmp_path):
    """Put a project on the node, plant a link and a FIFO beside it there (as a job
    could), and a name that is not UTF-8, and fetch the tree back: what comes back
    is the project, whole.  And a recovering server's claim of a launch."""
    src = project(tmp_path / "src")
    link.new_folder("0" * 24, {})
    link.put_tree(src, f"{'0' * 24}/proj")
    assert not (on_node / "proj" / "passwd").exists(), "put_tree followed a link"
    os.symlink("/etc/shadow", on_node / "proj" / "shadow")
    os.mkfifo(on_node / "proj" / "pipe")
    (on_node / "proj" / os.fsdecode(b"caf\xe9")).write_bytes(b"x")

    entries, more = link.list_tree("0" * 24, 100)
    kinds = {e.path: e.kind for e in entries}
    assert not more and kinds == {
        "proj": "dir", "proj/main.py": "file", "proj/pkg": "dir", "proj/empty": "dir",
        "proj/pkg/__init__.py": "file", "proj/pkg/data": "dir",
        "proj/pkg/data/blob.bin": "file", "proj/shadow": "link", "proj/pipe": "other",
        "proj/caf\udce9": "unnamed"}
    paths = [e.path for e in entries]
    assert paths.index("proj/pkg") < paths.index("proj/pkg/data/blob.bin")  # parents first
    assert link.list_tree("0" * 24, 3) == (entries[:3], True)

    copied, left = link.fetch_tree("0" * 24, tmp_path / "back", 100, 10 ** 9)
    assert digests(tmp_path / "back" / "proj") == digests(src)
    assert {e.path for e in left} == {"proj/shadow", "proj/pipe", "proj/caf\udce9"}
    assert sum(e.size for e in copied) == sum(p.stat().st_size for p in src.rglob("*")
                                              if p.is_file() and not p.is_symlink())
    assert not (tmp_path / "back" / "proj" / "shadow").exists()

    # Past the byte limit, what does not fit is left out and named.
    copied, left = link.fetch_tree("0" * 24, tmp_path / "small", 100, 1000)
    assert "proj/pkg/data/blob.bin" in {e.path for e in left}
    assert "proj/main.py" in {e.path for e in copied}

    # A launch claimed for a start that never happened: again (a recovery cut short
    # and run again), it is still this claim; a wrapper's claim is not; no folder, none.
    assert link.claim_void(f"{'0' * 24}/launched") is True
    assert os.readlink(on_node / "launched") == gpuqueue.NodeFiles.VOID
    assert link.claim_void(f"{'0' * 24}/launched") is True
    (on_node / "taken").touch()
    assert link.claim_void(f"{'0' * 24}/taken") is False
    assert link.claim_void(f"{'9' * 24}/launched") is True

    link.remove("0" * 24)
    assert not link.exists("0" * 24) and not on_node.exists()


def test_a_local_link_moves_a_tree_both_ways(tmp_path):
    node = gpuqueue.load_config().nodes[0]
    link = gpuqueue.LocalLink(node, tmp_path / "work")
    link.connect()
    round_trip(link, tmp_path / "work" / ("0" * 24), tmp_path)


def test_a_local_move_takes_no_outputs_folder_for_none_only_beside_its_jobs_folder(tmp_path):
    """A job that made no outputs folder made no files: an empty one is moved in.  A
    job whose whole folder is gone from the node is not moved (the copy that follows
    says it is gone): its files are lost, not none."""
    link = gpuqueue.LocalLink(gpuqueue.load_config().nodes[0], tmp_path / "work")
    link.connect()
    link.new_folder("4" * 24, {})
    assert link.move_tree(f"{'4' * 24}/outputs", tmp_path / "made-none") is True
    assert list((tmp_path / "made-none").iterdir()) == []
    assert link.move_tree(f"{'5' * 24}/outputs", tmp_path / "gone") is False
    assert not (tmp_path / "gone").exists()


def test_a_link_a_run_as_job_planted_is_no_recovery_claim(tmp_path):
    """Under run_as a job owns its folder, and could swap its wrapper's claim for a
    link to void: only a link of the server's own says that the job never started."""
    link = gpuqueue.LocalLink(gpuqueue.load_config().nodes[0], tmp_path / "work")
    link.connect()
    link.new_folder("3" * 24, {})
    planted = tmp_path / "work" / ("3" * 24) / "launched"
    os.symlink(gpuqueue.NodeFiles.VOID, planted)
    os.lchown(planted, 4321, 4321)  # the job's user's (the tests run as root)
    assert link.claim_void(f"{'3' * 24}/launched") is False


def test_a_local_link_never_reads_through_a_swapped_folder(tmp_path):
    """A job that makes a folder of its tree a link after it was listed (its folder
    is its own under run_as) gets no file from where the link points."""
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "data").write_text("not the job's\n")
    link = gpuqueue.LocalLink(gpuqueue.load_config().nodes[0], tmp_path / "work")
    link.connect()
    link.new_folder("1" * 24, {})
    os.symlink(secret, tmp_path / "work" / ("1" * 24) / "sub")
    with pytest.raises(OSError):
        link._open_file(f"{'1' * 24}/sub/data")


def test_an_ssh_link_moves_a_tree_both_ways(tmp_path):
    root = tmp_path / "cluster"
    root.mkdir()
    cluster = Cluster(root, n=1).start()
    try:
        config_file = tmp_path / "gpuqueue.yaml"
        config_file.write_text(yaml.safe_dump(cluster.config()))
        config = gpuqueue.load_config(config_file)
        link = gpuqueue.SshLink(config.nodes[0], config)
        link.connect()
        try:
            round_trip(link, Path(config.nodes[0].workdir) / ("0" * 24), tmp_path)
            # A claim that did not take (the login may not write there) leaves nothing
            # at the name: no proof the job launched, so tried again, not taken for one.
            root_owned = Path(config.nodes[0].workdir) / ("4" * 24)
            root_owned.mkdir(mode=0o755)
            with pytest.raises(gpuqueue.NodeError):
                link.claim_void(f"{'4' * 24}/launched")
        finally:
            link.close()
    finally:
        cluster.stop()


def test_a_file_that_shrinks_after_its_listing_is_listed_as_it_came(tmp_path):
    """A process the job left behind may still change its files: one that shrank
    between the listing and the copy is listed with the size and digest of what was
    stored, never with the size it was listed at."""
    link = gpuqueue.LocalLink(gpuqueue.load_config().nodes[0], tmp_path / "work")
    link.connect()
    job = "2" * 24
    link.new_folder(job, {"f.bin": b"x" * 10})
    entries, _ = link.list_tree(job, 10)
    (tmp_path / "work" / job / "f.bin").write_bytes(b"four")
    copied, left = link.fetch_tree(job, tmp_path / "back", 10, 1000, entries=entries)
    listing = gpuqueue.outputs_listing(tmp_path / "back", copied, left, False,
                                       gpuqueue.load_config())
    assert listing["files"] == [{"path": "f.bin", "size": 4,
                                 "sha256": hashlib.sha256(b"four").hexdigest()}], listing
