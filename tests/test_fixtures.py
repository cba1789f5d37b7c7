"""The test infrastructure itself, checked against the real tools: Python's ssl, wget,
gpg/dirmngr, GNU tar and the Debian lxc-download shell template."""

from __future__ import annotations

import http.client
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import support
from support import Catalog, GpgKeys, ImageServer, Pki

SINGLE = "single/one/amd64/default/20261127_00:00"
FETCH = ("import sys, urllib.request\n"
         "sys.stdout.buffer.write(urllib.request.urlopen(sys.argv[1], timeout=10).read())\n")


def _get(url: str, pki: Pki, headers: dict = None) -> http.client.HTTPResponse:
    req = urllib.request.Request(url, headers=headers or {})
    return urllib.request.urlopen(req, context=pki.client_context(), timeout=10)


def test_source_tree_has_every_hard_case(catalog: Catalog) -> None:
    snap = support.tree_snapshot(catalog.image("single").tree)
    assert snap["usr/bin/suid-tool"]["mode"] == 0o4755
    assert snap["srv/setgid-dir"]["mode"] == 0o2775
    assert snap["tmp"]["mode"] == 0o1777
    assert snap["usr/share/readonly"]["mode"] == 0o555
    assert snap["dev/null"]["type"] == "char" and snap["dev/null"]["rdev"] == (1, 3)
    assert snap["dev/loop9"]["type"] == "block" and snap["dev/loop9"]["rdev"] == (7, 9)
    assert snap["run/test.fifo"]["type"] == "fifo"
    assert snap["usr/share/hard/a.txt"]["links"] == ("usr/share/hard/a.txt",
                                                     "usr/share/hard/b.txt")
    assert snap["etc/dangling"]["target"] == "/nonexistent/dangling-target"
    assert snap["usr/lib/rel-link"]["target"] == "../share/hard/a.txt"
    assert snap["home/user/other-gid"]["uid"] == 1000 and snap["home/user/other-gid"]["gid"] == 1001
    assert snap[support.XATTR_FILE]["xattrs"] == {"user.test": b"hello"}
    assert snap[support.CAP_FILE]["xattrs"] == {"security.capability": support.CAP_NET_RAW_EP}
    assert snap["etc/old-file"]["mtime"] == support.OLD_MTIME * 10**9
    assert support.NON_ASCII in snap and "usr/share/long/" + support.LONG_NAME in snap
    assert len(support.LONG_DIR + "/file-in-long-dir") > 100
    assert "etc/init/tty.conf" not in snap
    assert (catalog.image("single").tree / "etc/build").read_text() == "20261127_00:00\n"
    if shutil.which("getcap"):
        out = subprocess.run(["getcap", str(catalog.image("single").tree / support.CAP_FILE)],
                             stdout=subprocess.PIPE, text=True).stdout
        assert "cap_net_raw=ep" in out


def test_https_trusted_through_ssl_cert_file(env: dict, image_server: ImageServer) -> None:
    url = image_server.https_url + "/meta/1.0/index-system.7"
    ok = support.run_cmd([sys.executable, "-c", FETCH, url], env)
    assert ok.returncode == 0 and ok.stdout.startswith("testos;stable;amd64;default;")
    untrusted = dict(env)
    del untrusted["SSL_CERT_FILE"]
    bad = support.run_cmd([sys.executable, "-c", FETCH, url], untrusted)
    assert bad.returncode != 0 and "CERTIFICATE_VERIFY_FAILED" in bad.stderr


def test_wget_trusts_through_wgetrc(env: dict, image_server: ImageServer, tmp_path: Path,
                                    catalog: Catalog) -> None:
    out = tmp_path / "index"
    url = image_server.https_url + "//meta/1.0//index-system.7"
    assert support.run_cmd(["wget", "-q", "-O", str(out), url], env).returncode == 0
    assert out.read_bytes() == (catalog.docroot / "meta/1.0/index-system.7").read_bytes()
    no_rc = dict(env, WGETRC=str(tmp_path / "empty-wgetrc"))
    (tmp_path / "empty-wgetrc").write_text("")
    assert support.run_cmd(["wget", "-q", "-O", str(out), url], no_rc).returncode == 5


def test_range_double_slashes_and_log(image_server: ImageServer, pki: Pki,
                                      catalog: Catalog) -> None:
    img = catalog.image("single")
    data = img.rootfs_tar.read_bytes()
    url = image_server.https_url + "/" + img.entry.path + "/rootfs.tar.xz"
    assert "//" in url.split("://", 1)[1]
    r = _get(url, pki, {"Range": "bytes=100-"})
    assert r.status == 206
    assert r.headers["Content-Range"] == "bytes 100-%d/%d" % (len(data) - 1, len(data))
    assert int(r.headers["Content-Length"]) == len(data) - 100
    assert r.read() == data[100:]
    full = _get(url, pki)
    assert full.status == 200 and full.read() == data
    rootfs = img.entry.path + "rootfs.tar.xz"
    assert image_server.count(rootfs) == 2 and image_server.count("*/rootfs.tar.xz") == 2
    assert image_server.requests[0].range == "bytes=100-"
    image_server.clear_log()
    assert image_server.paths() == []
    with pytest.raises(urllib.error.HTTPError) as e:
        _get(image_server.https_url + "/images/../../etc/passwd", pki)
    assert e.value.code == 404


def test_plain_http_side_serves_the_same_docroot(image_server: ImageServer) -> None:
    url = image_server.http_url + "/meta/1.0/index-user"
    body = urllib.request.urlopen(url, timeout=10).read()
    assert b"single;one;amd64" in body
    assert image_server.requests[-1].scheme == "http"


def test_fault_rules(image_server: ImageServer, pki: Pki, catalog: Catalog) -> None:
    path = "/meta/1.0/index-system.7"
    url = image_server.https_url + path
    rule = image_server.add_rule(path, support.status(500), times=2)
    for _ in range(2):
        with pytest.raises(urllib.error.HTTPError) as e:
            _get(url, pki)
        assert e.value.code == 500
    assert _get(url, pki).status == 200 and rule.hits == 2
    image_server.add_rule(path, support.serve_bytes(b"tampered\n"), times=1)
    assert _get(url, pki).read() == b"tampered\n"
    # HTTPS -> HTTP redirect: urllib follows it (a program must refuse it itself)
    image_server.add_rule(path, support.redirect_to_path(image_server, "http"), times=1)
    r = _get(url, pki)
    assert r.geturl().startswith(image_server.http_url)
    image_server.add_rule(path, support.truncate(50), times=1)
    with pytest.raises(http.client.IncompleteRead):
        _get(url, pki).read()
    image_server.add_rule(path, support.stall(0.3), times=1)
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        _get(url, pki).read()
    assert _get(url, pki).read() == (catalog.docroot / path.lstrip("/")).read_bytes()


def test_wget_resumes_a_cut_download_with_range(env: dict, image_server: ImageServer,
                                                tmp_path: Path, catalog: Catalog) -> None:
    img = catalog.image("single")
    path = img.entry.path + "rootfs.tar.xz"
    image_server.add_rule(path, support.truncate(300000), times=1)
    out = tmp_path / "rootfs.tar.xz"
    res = support.run_cmd(["wget", "-q", "-t", "3", "-O", str(out),
                           image_server.https_url + path], env)
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() == img.rootfs_tar.read_bytes()
    assert [r.range for r in image_server.requests] == [None, "bytes=300000-"]


def _gpg(home: Path, *args: str) -> subprocess.CompletedProcess:
    return support.run_gpg(home, *args, check=False)


def test_keyserver_recv_keys_with_real_gpg(gnupghome: Path, image_server: ImageServer,
                                          gpg_keys: GpgKeys) -> None:
    ks = ["--keyserver", image_server.keyserver_url]
    res = _gpg(gnupghome, *ks, "--recv-keys", gpg_keys.test_fpr)
    assert res.returncode == 0, res.stderr.decode()
    assert support.key_fingerprints(gnupghome, gpg_keys.test_fpr) == [
        gpg_keys.test_fpr, gpg_keys.test_subkey_fpr]
    lookups = [r for r in image_server.requests if r.path == "/pks/lookup"]
    assert lookups and lookups[0].scheme == "http" and "op=get" in lookups[0].query
    assert _gpg(gnupghome, *ks, "--recv-keys", "A" * 40).returncode != 0  # unknown: 404
    image_server.keyserver_status = 503
    assert _gpg(gnupghome, *ks, "--recv-keys", gpg_keys.foreign_fpr).returncode != 0


def test_signatures_are_subkey_signatures_by_the_test_key(
        gnupghome: Path, gpg_keys: GpgKeys, catalog: Catalog, tmp_path: Path) -> None:
    for key in ("test", "foreign"):
        _gpg(gnupghome, "--import", str(getattr(gpg_keys, key + "_pubkey")))
    img = catalog.image("testos", "stable", "amd64")
    res = _gpg(gnupghome, "--status-fd", "1", "--verify", str(img.rootfs_tar) + ".asc",
               str(img.rootfs_tar))
    validsig = [ln.split() for ln in res.stdout.decode().splitlines() if "VALIDSIG" in ln]
    assert res.returncode == 0 and validsig
    assert validsig[0][2] == gpg_keys.test_subkey_fpr and validsig[0][-1] == gpg_keys.test_fpr
    other = tmp_path / "file"
    other.write_text("x")
    gpg_keys.sign(other, "foreign")
    res = _gpg(gnupghome, "--status-fd", "1", "--verify", str(other) + ".asc", str(other))
    assert res.returncode == 0 and gpg_keys.test_fpr not in res.stdout.decode()
    gnupg = pytest.importorskip("gnupg")
    v = gnupg.GPG(gnupghome=str(gnupghome)).verify_file(
        open(str(img.meta_tar) + ".asc", "rb"), str(img.meta_tar))
    assert v.valid and v.pubkey_fingerprint == gpg_keys.test_fpr
    assert v.fingerprint == gpg_keys.test_subkey_fpr


def test_catalog_indexes(catalog: Catalog, image_server: ImageServer, pki: Pki) -> None:
    compat = _get(image_server.https_url + "/meta/1.0/index-system.7", pki).read().decode()
    plain = _get(image_server.https_url + "/meta/1.0/index-system", pki).read().decode()
    assert ";cloud;" in compat and ";cloud;" not in plain
    assert "\n\n" in compat and support.MALFORMED_LINE in compat
    builds = [ln.split(";")[4] for ln in compat.splitlines() if ln.startswith("testos;stable;amd64;default;")]
    assert builds == ["20261101_00:00", "20261127_05:24"]
    assert catalog.image("testos", "stable", "amd64").entry.build == "20261127_05:24"
    mirror = support.MIRROR_PREFIX
    with pytest.raises(urllib.error.HTTPError):
        _get(image_server.https_url + mirror + "/meta/1.0/index-user.7", pki)
    index = _get(image_server.https_url + mirror + "/meta/1.0/index-user", pki).read().decode()
    line = next(ln for ln in index.splitlines() if ln.startswith("single;"))
    rel = line.split(";")[5]
    assert rel.startswith("/images/")
    body = _get(image_server.https_url + mirror + rel + "meta.tar.xz", pki).read()
    assert body == catalog.image("single").meta_tar.read_bytes()


def test_image_tarballs_are_distrobuilder_shaped(catalog: Catalog, tmp_path: Path) -> None:
    img = catalog.image("single")
    names = subprocess.run(["tar", "-tJf", str(img.rootfs_tar)], stdout=subprocess.PIPE,
                           text=True, check=True).stdout.splitlines()
    assert names[0] == "./" and all(n.startswith("./") for n in names)
    meta = subprocess.run(["tar", "-tJf", str(img.meta_tar)], stdout=subprocess.PIPE,
                          text=True, check=True).stdout.split()
    assert set(meta) == {"./"} | {"./" + n for n in support.default_meta_files()}
    # tar with --xattrs restores the source exactly, capabilities included
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpJf",
                    str(img.rootfs_tar), "-C", str(out)], check=True)
    assert support.diff_snapshots(support.tree_snapshot(img.tree),
                                  support.tree_snapshot(out)) == []


def test_private_server_copy_is_isolated(private_server: ImageServer, catalog: Catalog,
                                         pki: Pki, gpg_keys: GpgKeys, tmp_path: Path) -> None:
    rel = "meta/1.0/index-system.7"
    with open(str(private_server.docroot / rel), "a") as f:  # in place, on purpose
        f.write("evil;line;amd64;default;1;/x/\n")
    assert b"evil" in _get(private_server.https_url + "/" + rel, pki).read()
    assert b"evil" not in (catalog.docroot / rel).read_bytes()
    img = support.publish_image(private_server.docroot, support.ImageSpec(
        "extra", "r", "amd64", "20270101_00:00", tty_conf=True, meta={"create-message": None}),
        gpg_keys, tmp_path, sign="foreign")
    assert (img.tree / "etc/init/tty.conf").read_text() == support.TTY_CONF
    assert (img.dir / "rootfs.tar.xz.asc").exists()


def test_shell_template_builds_single_image(run_shell_template, container, shell_env: dict,
                                           image_server: ImageServer,
                                           catalog: Catalog) -> None:
    res = run_shell_template(*container.shell_args(image_server), "-d", "single", "-r", "one",
                             "-a", "amd64")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Unpacking the rootfs" in res.stdout
    # the shell prints create-message verbatim: no LXC_NAME substitution there
    assert "---\nYou just created a test container (LXC_NAME)\n" in res.stdout
    img = catalog.image("single")
    assert image_server.count(img.entry.path + "rootfs.tar.xz") == 1
    assert image_server.requests[0].path == "/meta/1.0/index-system.7"
    assert "compat:7" in (image_server.requests[0].user_agent or "")
    # GNU tar without --xattrs (as the shell template runs it) drops all xattrs;
    # hostname is templated (sed -i, which also bumps etc/'s mtime); dev/pts is added.
    diff = support.diff_snapshots(support.tree_snapshot(img.tree),
                                  support.tree_snapshot(container.rootfs),
                                  ignore_fields=("xattrs",),
                                  ignore_paths=("etc/hostname", "dev", "dev/pts"))
    assert [d for d in diff if not d.startswith("etc: mtime ")] == []
    rootfs_snap = support.tree_snapshot(container.rootfs)
    assert all(not v["xattrs"] for v in rootfs_snap.values())
    assert (container.rootfs / "etc/hostname").read_text() == "c1\n"
    config = container.config.read_text()
    assert "# Distribution configuration\nlxc.include = /usr/share/lxc/config/common.conf" in config
    assert "lxc.uts.name = c1" in config and "# Network configuration\nlxc.net.0.type = empty" in config
    cache = Path(shell_env["LXC_CACHE_PATH"]) / "download/single/one/amd64/default"
    assert (cache / "build_id").read_text() == "20261127_00:00\n"
