"""Unpacking the rootfs (SPEC §10.1; issue 2 "same result as the shell template", issue 3
"hostile images").

- The program's rootfs equals the Debian shell template's, built from the same server,
  except that the program also restores xattrs (user.*, security.capability); and it
  equals the image's source tree.
- Both decompression paths (xz from PATH, Python's lzma without it) give the same tree.
- `excludes` (the relevant file) skips members with tar's anchored semantics.
- Hostile tarballs (absolute paths, `..`, symlinks and hard links leading out of the
  rootfs, writes through a directory symlink, templated files that are symlinks to host
  files) never create, follow or modify anything outside --rootfs, and are refused with an
  `ERROR:` naming the member.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest

import support
from support import Catalog, Container, GpgKeys, ImageServer, Pki

SINGLE = ("-d", "single", "-r", "one", "-a", "amd64")
# Paths the templates rewrite (etc/hostname, and sed -i replaces it, bumping etc/'s mtime)
# and dev/ (dev/pts is made after the unpack): their mtimes are "now", not the image's.
NOW_MTIMES = ("etc/hostname", "etc", "dev", "dev/pts")


def _strip(snap: Dict[str, Dict], paths=NOW_MTIMES, xattrs: bool = False) -> Dict[str, Dict]:
    """A copy of a snapshot without the mtimes of `paths` (and without xattrs if asked)."""
    out = {}
    for rel, entry in snap.items():
        entry = dict(entry)
        if rel in paths:
            entry["mtime"] = None
        if xattrs:
            entry["xattrs"] = None
        out[rel] = entry
    return out


def _xattr_map(snap: Dict[str, Dict]) -> Dict[str, Dict[str, bytes]]:
    return {rel: e["xattrs"] for rel, e in snap.items() if e["xattrs"]}


def _ok(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 0, "rc=%d\nstdout:\n%s\nstderr:\n%s" % (
        res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr


# ---------------------------------------------------------------------------
# (a) same tree as the shell template, plus xattrs
# ---------------------------------------------------------------------------

def test_rootfs_equals_shell_template_tree_plus_xattrs(
        run_download, run_shell_template, image_server: ImageServer, gpg_keys: GpgKeys,
        catalog: Catalog, tmp_path: Path) -> None:
    prog = support.make_container(tmp_path / "prog", "c1")
    shell = support.make_container(tmp_path / "shell", "c1")
    res = run_shell_template(*shell.shell_args(image_server), *SINGLE)
    _ok(res)
    res = run_download(*prog.args(image_server, gpg_keys), *SINGLE)
    _ok(res)
    assert "Unpacking the rootfs\n" in res.stdout

    source = support.tree_snapshot(catalog.image("single", "one", "amd64").tree)
    prog_snap = support.tree_snapshot(prog.rootfs)
    shell_snap = support.tree_snapshot(shell.rootfs)

    # The shell drops every xattr; otherwise the two trees are the same, entry by entry.
    assert _xattr_map(shell_snap) == {}
    assert support.diff_snapshots(_strip(shell_snap, xattrs=True),
                                  _strip(prog_snap, xattrs=True)) == []
    assert (prog.rootfs / "etc/hostname").read_text() == "c1\n"
    assert (shell.rootfs / "etc/hostname").read_text() == "c1\n"

    # ... while the program restores them exactly as the source tree has them.
    assert _xattr_map(prog_snap) == _xattr_map(source)
    assert _xattr_map(prog_snap) == {
        support.XATTR_FILE: {"user.test": b"hello"},
        support.CAP_FILE: {"security.capability": support.CAP_NET_RAW_EP}}

    # The program's tree is the source tree, except the templated hostname and dev/pts.
    expected = _strip(source)
    expected["etc/hostname"]["size"] = len("c1\n")
    got = _strip(prog_snap)
    assert got.pop("dev/pts")["type"] == "dir"
    assert support.diff_snapshots(expected, got) == []
    # etc/ is not re-created by the program's templating (in place, no sed -i): its mtime
    # is still the image's.
    assert prog_snap["etc"]["mtime"] == source["etc"]["mtime"]

    # The hard cases, spelled out (the comparisons above already cover them).
    for snap in (prog_snap, shell_snap):
        assert snap["usr/bin/suid-tool"]["mode"] == 0o4755
        assert snap["srv/setgid-dir"]["mode"] == 0o2775
        assert snap["tmp"]["mode"] == 0o1777
        assert snap["usr/share/readonly"]["mode"] == 0o555
        assert snap["usr/share/readonly/file.txt"]["mode"] == 0o444
        assert snap["dev/null"]["type"] == "char" and snap["dev/null"]["rdev"] == (1, 3)
        assert snap["dev/zero"]["rdev"] == (1, 5)
        assert snap["dev/loop9"]["type"] == "block" and snap["dev/loop9"]["rdev"] == (7, 9)
        assert snap["run/test.fifo"]["type"] == "fifo"
        assert snap["etc/dangling"]["target"] == "/nonexistent/dangling-target"
        assert snap["usr/share/hard/b.txt"]["links"] == ("usr/share/hard/a.txt",
                                                         "usr/share/hard/b.txt")
        assert (snap["home/user/file.txt"]["uid"], snap["home/user/file.txt"]["gid"]) == (1000, 1000)
        assert snap["home/user/other-gid"]["gid"] == 1001
        assert snap["etc/old-file"]["mtime"] == support.OLD_MTIME * 10**9
        assert snap[support.SUBSECOND_FILE]["mtime"] == support.SUBSECOND_MTIME_NS
        assert support.LONG_DIR + "/file-in-long-dir" in snap
        assert "usr/share/long/" + support.LONG_NAME in snap
        assert support.NON_ASCII in snap
        assert snap["dev/pts"]["type"] == "dir"
    assert (prog.rootfs / support.NON_ASCII).read_text() == "non-ascii\n"
    assert (prog.rootfs / "usr/share/readonly/file.txt").read_text() == "read only\n"


# ---------------------------------------------------------------------------
# (b) xz from PATH, or Python's lzma
# ---------------------------------------------------------------------------

def _path_dir(where: Path, xz_log: Optional[Path]) -> str:
    """A PATH with only what validation needs (gpg & co.) and, if xz_log is given, an `xz`
    wrapper that logs its arguments and runs the real xz."""
    where.mkdir(parents=True)
    for tool in ("gpg", "gpgconf", "gpg-agent", "dirmngr", "gpg-connect-agent", "gpgsm"):
        real = shutil.which(tool)
        if real:
            os.symlink(real, str(where / tool))
    if xz_log is not None:
        real_xz = shutil.which("xz")
        assert real_xz
        wrapper = where / "xz"
        wrapper.write_text('#!/bin/sh\necho "$@" >> "%s"\nexec %s "$@"\n' % (xz_log, real_xz))
        wrapper.chmod(0o755)
    return str(where)


def test_lzma_fallback_without_xz_gives_the_same_tree(
        run_download, env: Dict[str, str], image_server: ImageServer, gpg_keys: GpgKeys,
        catalog: Catalog, tmp_path: Path) -> None:
    log = tmp_path / "xz.log"
    with_xz = dict(env, PATH=_path_dir(tmp_path / "bin-xz", log))
    without_xz = dict(env, PATH=_path_dir(tmp_path / "bin-noxz", None))
    assert shutil.which("xz", path=without_xz["PATH"]) is None
    assert shutil.which("gpg", path=without_xz["PATH"]) is not None

    a = support.make_container(tmp_path / "a", "c1")
    res = run_download(*a.args(image_server, gpg_keys), *SINGLE, env=with_xz)
    _ok(res)
    assert log.exists() and "rootfs.tar.xz" in log.read_text(), "xz from PATH was not used"
    log.unlink()

    b = support.make_container(tmp_path / "b", "c1")
    res = run_download(*b.args(image_server, gpg_keys), *SINGLE, "--flush-cache", env=without_xz)
    _ok(res)
    assert "Unpacking the rootfs\n" in res.stdout
    assert not log.exists()

    snap_a = _strip(support.tree_snapshot(a.rootfs))
    snap_b = _strip(support.tree_snapshot(b.rootfs))
    assert support.diff_snapshots(snap_a, snap_b) == []
    source = _strip(support.tree_snapshot(catalog.image("single").tree))
    source["etc/hostname"]["size"] = 3
    snap_b.pop("dev/pts")
    assert support.diff_snapshots(source, snap_b) == []


# ---------------------------------------------------------------------------
# (c) excludes
# ---------------------------------------------------------------------------

def _publish(server: ImageServer, keys: GpgKeys, work: Path,
             spec: support.ImageSpec) -> support.PublishedImage:
    img = support.publish_image(server.docroot, spec, keys, work)
    support.write_index(server.docroot, "system", [img.entry], True, keys)
    return img


def test_excludes_skip_anchored_members_like_tar(
        run_download, run_shell_template, private_server: ImageServer, gpg_keys: GpgKeys,
        tmp_path: Path) -> None:
    def hook(root: Path) -> None:
        for rel in ("opt/skip/inner.txt", "opt/skip/sub/deep.txt", "opt/keep/zero",
                    "opt/skipped-not.txt", "null"):
            support._write(root, rel, rel + "\n")

    spec = support.ImageSpec("excl", "r1", "amd64", "20270101_00:00", hook=hook, meta={
        # ./dev/null: a device; ./opt/skip: a directory and all below it; ./zero and
        # ./keep/zero must not match dev/zero or opt/keep/zero (anchored at the top).
        "excludes": "./dev/null\n./opt/skip\n./zero\n./keep/zero\n"})
    work = tmp_path / "work"
    work.mkdir()
    img = _publish(private_server, gpg_keys, work, spec)

    prog = support.make_container(tmp_path / "prog", "c1")
    res = run_download(*prog.args(private_server, gpg_keys), "-d", "excl", "-r", "r1", "-a", "amd64")
    _ok(res)
    root = prog.rootfs
    assert not os.path.lexists(str(root / "dev/null"))
    assert not os.path.lexists(str(root / "opt/skip"))
    assert (root / "dev/zero").is_char_device() and (root / "dev/loop9").is_block_device()
    assert (root / "opt/keep/zero").read_text() == "opt/keep/zero\n"
    assert (root / "opt/skipped-not.txt").read_text() == "opt/skipped-not.txt\n"
    assert (root / "null").read_text() == "null\n"

    # Everything else is there, as in the source tree.
    source = _strip(support.tree_snapshot(img.tree))
    source["etc/hostname"]["size"] = 3
    got = _strip(support.tree_snapshot(root))
    got.pop("dev/pts")
    gone = ("dev/null", "opt/skip", "opt/skip/inner.txt", "opt/skip/sub", "opt/skip/sub/deep.txt")
    for rel in gone:
        source.pop(rel)
    assert support.diff_snapshots(source, got) == []

    # GNU tar --anchored --exclude, as the shell template runs it, agrees.
    shell = support.make_container(tmp_path / "shell", "c1")
    _ok(run_shell_template(*shell.shell_args(private_server), "-d", "excl", "-r", "r1", "-a", "amd64"))
    assert sorted(support.tree_snapshot(shell.rootfs)) == sorted(support.tree_snapshot(root))


# ---------------------------------------------------------------------------
# (d) hostile tarballs
# ---------------------------------------------------------------------------

Member = Tuple[tarfile.TarInfo, Optional[bytes]]


def _dir(name: str) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, support.FIXED_MTIME
    return info, None


def _file(name: str, data: bytes = b"evil\n") -> Member:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, support.FIXED_MTIME
    return info, data


def _sym(name: str, target: str) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode, info.mtime = (tarfile.SYMTYPE, target, 0o777,
                                                       support.FIXED_MTIME)
    return info, None


def _hard(name: str, target: str) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode, info.mtime = (tarfile.LNKTYPE, target, 0o644,
                                                       support.FIXED_MTIME)
    return info, None


def _base() -> List[Member]:
    return [_dir("./"), _dir("./etc/"), _file("./etc/build", b"hostile\n"), _dir("./dev/")]


HOST_FILE_TEXT = "LXC_NAME host file: must never change\n"
HOST_TTY_TEXT = "exec /sbin/mingetty tty1\n"


def _hostile_cases(host: str) -> Dict[str, Tuple[List[Member], str, Dict[str, Optional[str]]]]:
    """release -> (members, the member the ERROR must name, meta overrides)."""
    return {
        "abs": (_base() + [_file(host + "/empty/evil-abs")], host + "/empty/evil-abs", {}),
        "dotdot": (_base() + [_file("../evil-dotdot")], "../evil-dotdot", {}),
        "middotdot": (_base() + [_dir("./a/"), _file("./a/../../evil-mid")],
                      "./a/../../evil-mid", {}),
        "dirlink": (_base() + [_sym("./link", host + "/empty"), _file("./link/evil-link")],
                    "./link/evil-link", {}),
        "reldirlink": (_base() + [_sym("./up", ".."), _file("./up/evil-up")], "./up/evil-up", {}),
        "hardlink-abs": (_base() + [_hard("./hl", host + "/hostfile")], "./hl", {}),
        "hardlink-dotdot": (_base() + [_hard("./hl", "../../outside")], "./hl", {}),
    }


@pytest.fixture(scope="module")
def host_dir() -> Iterator[Path]:
    """Files and an empty directory on the host (same filesystem as the rootfs), which
    hostile members aim at: they must never change."""
    d = Path(tempfile.mkdtemp(prefix="lxd-host-", dir="/tmp"))
    (d / "empty").mkdir()
    (d / "hostfile").write_text(HOST_FILE_TEXT)
    (d / "ttyfile").write_text(HOST_TTY_TEXT)
    yield d
    shutil.rmtree(str(d), ignore_errors=True)




@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory: pytest.TempPathFactory, pki: Pki, gpg_keys: GpgKeys,
                   host_dir: Path) -> Iterator[ImageServer]:
    """A signed server (index-system.7) whose images `hostile/<case>/amd64` are hostile:
    a compromised mirror, as far as the program can tell."""
    root = tmp_path_factory.mktemp("hostile")
    docroot, work = root / "docroot", root / "work"
    work.mkdir()
    host = str(host_dir)
    cases = _hostile_cases(host)
    cases.update({
        "replace-symlink": (_base() + [_sym("./victim", host + "/hostfile"),
                                       _file("./victim", b"replaced\n")], "./victim", {}),
        "templates-symlink": (_base() + [_sym("./etc/hostname", host + "/hostfile")],
                              "./etc/hostname", {"templates": "/etc/hostname\n"}),
        "templates-dirlink": ([_dir("./"), _sym("./etc", host), _dir("./dev/")], "./etc",
                              {"templates": "/etc/hostfile\n"}),
        "tty-symlink": (_base() + [_dir("./etc/init/"),
                                   _sym("./etc/init/tty.conf", host + "/ttyfile")],
                        "./etc/init/tty.conf", {}),
    })
    entries = []
    for release, (members, _, meta) in cases.items():
        build = "20270101_00:00"
        out = docroot / "images/hostile" / release / "amd64/default" / build
        out.mkdir(parents=True)
        support.write_tar_xz(out / "rootfs.tar.xz", members)
        support.build_meta(out / "meta.tar.xz", work / release, meta=meta)
        for name in ("rootfs.tar.xz", "meta.tar.xz"):
            gpg_keys.sign(out / name)
        entries.append(support.IndexEntry("hostile", release, "amd64", "default", build,
                                          "/images/hostile/%s/amd64/default/%s/" % (release, build)))
    support.write_index(docroot, "system", entries, True, gpg_keys)
    server = ImageServer(docroot, pki)
    server.add_key(gpg_keys.armored("test"), [gpg_keys.test_fpr, gpg_keys.test_subkey_fpr])
    yield server
    server.close()


def _host_state(host_dir: Path) -> Dict[str, Tuple]:
    """Everything about the host directory: entries, inodes, link counts, contents."""
    state = {}
    for rel, e in support.tree_snapshot(host_dir).items():
        st = os.lstat(str(host_dir / rel))
        data = (host_dir / rel).read_bytes() if e["type"] == "file" else None
        state[rel] = (e["type"], e["mode"], e["mtime"], st.st_ino, st.st_nlink, data)
    return state


def _outside_listing(base: Path, rootfs: Path) -> List[str]:
    """Every path under base except those inside the rootfs."""
    out = []
    for dirpath, dirnames, filenames in os.walk(str(base)):
        if Path(dirpath) == rootfs:
            dirnames[:] = []
            continue
        for n in dirnames + filenames:
            full = Path(dirpath) / n
            if full != rootfs:
                out.append(str(full.relative_to(base)))
    return sorted(out)


def _hostile_container(tmp_path: Path) -> Tuple[Path, Container]:
    base = tmp_path / "ct"
    c = support.make_container(base / "parent", "c1")
    # a file for "../../outside" to hard-link to (from <base>/parent/c1/rootfs)
    (base / "parent/outside").write_text("outside\n")
    return base, c


@pytest.mark.parametrize("release", sorted(_hostile_cases("/h")))
def test_hostile_member_is_refused_and_nothing_outside_changes(
        release: str, run_download, hostile_server: ImageServer, gpg_keys: GpgKeys,
        host_dir: Path, tmp_path: Path) -> None:
    member = _hostile_cases(str(host_dir))[release][1]
    base, c = _hostile_container(tmp_path)
    host_before = _host_state(host_dir)
    outside_before = _outside_listing(base, c.rootfs)
    config_before = c.config.read_text()

    res = run_download(*c.args(hostile_server, gpg_keys), "-d", "hostile", "-r", release,
                       "-a", "amd64")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("ERROR: ")]
    assert len(errors) == 1, res.stderr
    assert "Unpacking the rootfs\n" in res.stdout

    assert _host_state(host_dir) == host_before
    assert _outside_listing(base, c.rootfs) == outside_before
    assert c.config.read_text() == config_before  # refused before configuring
    assert (base / "parent/outside").read_text() == "outside\n"
    assert os.stat(str(base / "parent/outside")).st_nlink == 1
    assert not any(n.startswith("evil") for n in os.listdir("/tmp"))
    assert member in errors[0], "ERROR does not name the member %r: %s" % (member, errors[0])


def test_symlink_replaced_by_file_does_not_write_through(
        run_download, hostile_server: ImageServer, gpg_keys: GpgKeys, host_dir: Path,
        tmp_path: Path) -> None:
    base, c = _hostile_container(tmp_path)
    before = _host_state(host_dir)
    res = run_download(*c.args(hostile_server, gpg_keys), "-d", "hostile", "-r",
                       "replace-symlink", "-a", "amd64")
    assert "Traceback" not in res.stderr
    assert _host_state(host_dir) == before
    assert (host_dir / "hostfile").read_text() == HOST_FILE_TEXT
    if res.returncode == 0:  # tar semantics: the later member replaces the symlink
        assert not (c.rootfs / "victim").is_symlink()
        assert (c.rootfs / "victim").read_text() == "replaced\n"
    else:
        assert res.returncode == 1 and "ERROR: " in res.stderr and "./victim" in res.stderr


@pytest.mark.parametrize("release, host_file, text", [
    ("templates-symlink", "hostfile", HOST_FILE_TEXT),
    ("templates-dirlink", "hostfile", HOST_FILE_TEXT),
    ("tty-symlink", "ttyfile", HOST_TTY_TEXT),
])
def test_templated_file_that_is_a_symlink_to_a_host_file_is_not_rewritten(
        release: str, host_file: str, text: str, run_download, hostile_server: ImageServer,
        gpg_keys: GpgKeys, host_dir: Path, tmp_path: Path) -> None:
    base, c = _hostile_container(tmp_path)
    before = _host_state(host_dir)
    res = run_download(*c.args(hostile_server, gpg_keys), "-d", "hostile", "-r", release,
                       "-a", "amd64")
    assert "Traceback" not in res.stderr
    assert (host_dir / host_file).read_text() == text
    assert _host_state(host_dir) == before
    if res.returncode == 0:  # the file was skipped, the container configured
        assert "lxc.uts.name = c1" in c.config.read_text()
        link = {"templates-symlink": "etc/hostname", "templates-dirlink": "etc",
                "tty-symlink": "etc/init/tty.conf"}[release]
        assert (c.rootfs / link).is_symlink()
    else:
        assert res.returncode == 1 and "ERROR: " in res.stderr
