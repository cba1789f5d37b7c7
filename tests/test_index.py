"""The server and the index: SPEC §4 (compat-7 index and fallback, line parsing, newest build,
server forms, HTTPS only and redirects, User-Agent, timeouts and retries) and issue 3's
network items (retries on 5xx, Range resume, bounded stalls, HTTPS->HTTP refused, index
paths that leave the server base). Real program, real loopback HTTPS server, real gpg.

index-user selection (unprivileged mode) is covered by the user-mode tests, not here."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest

import support
from support import Catalog, Container, GpgKeys, ImageServer, IndexEntry

NEWEST = "20261127_05:24"
OLDER = "20261101_00:00"
TESTOS = ("-d", "testos", "-r", "stable", "-a", "amd64")
SINGLE = ("-d", "single", "-r", "one", "-a", "amd64")
INDEX7 = "/meta/1.0/index-system.7"
INDEX = "/meta/1.0/index-system"


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def no_traceback(res) -> None:
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout, res.stderr


def error_lines(res) -> List[str]:
    return [ln for ln in res.stderr.splitlines() if ln.startswith("ERROR:")]


def built(container: Container) -> str:
    return (container.rootfs / "etc/build").read_text().strip()


def image_paths(server: ImageServer) -> List[str]:
    """Logged paths, keyserver lookups left out."""
    return [r.path for r in server.requests if r.path != "/pks/lookup"]


def rows(stdout: str) -> List[List[str]]:
    lines = stdout.splitlines()
    start = next(i for i, ln in enumerate(lines)
                 if ln.split() == ["DIST", "RELEASE", "ARCH", "VARIANT", "BUILD"])
    return [ln.split() for ln in lines[start + 1:] if len(ln.split()) == 5]


def args_for(container: Container, server: str, keys: GpgKeys) -> List[str]:
    return ["--name", container.name, "--path", str(container.path), "--rootfs",
            str(container.rootfs), "--server", server, "--keyid", keys.test_fpr]


def cached_rootfs(env: Dict[str, str]) -> List[Path]:
    return list(Path(env["LXC_CACHE_PATH"]).rglob("rootfs.tar.xz"))


def assert_nothing_unpacked(container: Container, env: Dict[str, str]) -> None:
    assert list(container.rootfs.iterdir()) == []
    assert cached_rootfs(env) == []


# ---------------------------------------------------------------------------
# selection and the compat index
# ---------------------------------------------------------------------------

def test_newest_build_wins_over_first_line(run_download, container_args: List[str],
                                           container: Container, image_server: ImageServer,
                                           catalog: Catalog) -> None:
    index = (catalog.docroot / INDEX7.lstrip("/")).read_text().splitlines()
    builds = [ln.split(";")[4] for ln in index if ln.startswith("testos;stable;amd64;default;")]
    assert builds == [OLDER, NEWEST]  # the older build is listed first
    res = run_download(*container_args, *TESTOS)
    assert res.returncode == 0, res.stderr
    assert built(container) == NEWEST
    assert image_server.count("/images/testos/stable/amd64/default/%s/rootfs.tar.xz" % NEWEST) == 1
    assert image_server.count("/images/testos/stable/amd64/default/%s/*" % OLDER) == 0


def test_compat_index_preferred_when_present(run_download, container_args: List[str],
                                             container: Container,
                                             image_server: ImageServer) -> None:
    # the cloud variant is listed only in index-system.7
    res = run_download(*container_args, *TESTOS, "--variant", "cloud")
    assert res.returncode == 0, res.stderr
    assert built(container) == NEWEST
    paths = image_paths(image_server)
    assert sorted(paths[:2]) == [INDEX7, INDEX7 + ".asc"]  # the file and its signature
    assert INDEX not in paths and INDEX + ".asc" not in paths
    assert image_server.count("/images/testos/stable/amd64/cloud/%s/rootfs.tar.xz" % NEWEST) == 1


def test_falls_back_to_plain_index_when_compat_absent(run_download, container: Container,
                                                      image_server: ImageServer,
                                                      gpg_keys: GpgKeys) -> None:
    mirror = support.MIRROR_PREFIX
    res = run_download(*args_for(container, image_server.host + mirror, gpg_keys), *SINGLE)
    assert res.returncode == 0, res.stderr
    assert built(container) == "20261127_00:00"
    paths = image_paths(image_server)
    first7 = min(i for i, p in enumerate(paths) if p.startswith(mirror + INDEX7))
    plain = paths.index(mirror + INDEX)
    assert first7 < plain
    assert mirror + INDEX + ".asc" in paths[first7 + 1:plain + 2]  # and its signature
    rootfs = "%s/images/single/one/amd64/default/20261127_00:00/rootfs.tar.xz" % mirror
    assert image_server.count(rootfs) == 1
    assert all(p.startswith(mirror + "/") for p in paths), paths  # the prefix is kept


def test_falls_back_when_compat_signature_missing(run_download, env: Dict[str, str],
                                                  private_server: ImageServer,
                                                  gpg_keys: GpgKeys) -> None:
    (private_server.docroot / (INDEX7.lstrip("/") + ".asc")).unlink()
    res = run_download("--list", "-d", "testos", "--server", private_server.host,
                       "--keyid", gpg_keys.test_fpr)
    assert res.returncode == 0, res.stderr
    listed = rows(res.stdout)
    # the plain index (no cloud variant) was used, not the unsigned compat one
    assert listed and all(r[3] == "default" for r in listed), listed
    paths = image_paths(private_server)
    assert INDEX7 + ".asc" in paths
    assert paths.index(INDEX) > paths.index(INDEX7 + ".asc")
    assert INDEX + ".asc" in paths


def test_blank_and_malformed_index_lines_skipped(run_download, container: Container,
                                                 env: Dict[str, str],
                                                 private_server: ImageServer,
                                                 gpg_keys: GpgKeys,
                                                 catalog: Catalog) -> None:
    good = catalog.image("single").entry
    lines = [
        "", "   ", "# a comment", support.MALFORMED_LINE,
        "too;many;fields;here;1;/images/x/;extra",
        ";;;;;", "single;one;amd64;default;;/images/single/",
        good, "",
    ]
    support.write_index(private_server.docroot, "system", lines, True, gpg_keys)
    listed = run_download("--list", "--server", private_server.host, "--keyid",
                          gpg_keys.test_fpr)
    assert listed.returncode == 0, listed.stderr
    assert rows(listed.stdout) == [[good.dist, good.release, good.arch, good.variant, good.build]]
    res = run_download(*args_for(container, private_server.host, gpg_keys), *SINGLE)
    assert res.returncode == 0, res.stderr
    no_traceback(res)
    assert built(container) == good.build


def test_catalog_malformed_line_not_listed(run_download, image_server: ImageServer,
                                           gpg_keys: GpgKeys, catalog: Catalog) -> None:
    res = run_download("--list", "--server", image_server.host, "--keyid", gpg_keys.test_fpr)
    assert res.returncode == 0, res.stderr
    assert "broken" not in res.stdout and "enough-fields" not in res.stdout
    assert len(rows(res.stdout)) == len(catalog.images)


def test_image_not_in_index(run_download, container_args: List[str], container: Container,
                            env: Dict[str, str]) -> None:
    res = run_download(*container_args, "-d", "testos", "-r", "stable", "-a", "arm64")
    assert res.returncode == 1
    assert error_lines(res) == ["ERROR: Couldn't find a matching image"]
    no_traceback(res)
    assert_nothing_unpacked(container, env)


# ---------------------------------------------------------------------------
# server forms, HTTPS only, redirects, User-Agent
# ---------------------------------------------------------------------------

def test_full_https_url_server(run_download, container: Container, image_server: ImageServer,
                               gpg_keys: GpgKeys) -> None:
    res = run_download(*args_for(container, image_server.https_url + "/", gpg_keys), *SINGLE)
    assert res.returncode == 0, res.stderr
    assert built(container) == "20261127_00:00"
    assert all(r.scheme == "https" for r in image_server.requests if r.path != "/pks/lookup")


def test_full_https_url_with_mirror_prefix(run_download, container: Container,
                                           image_server: ImageServer, gpg_keys: GpgKeys) -> None:
    server = image_server.https_url + support.MIRROR_PREFIX
    res = run_download(*args_for(container, server, gpg_keys), *TESTOS)
    assert res.returncode == 0, res.stderr
    assert built(container) == NEWEST
    assert image_server.count("/mirror/images/testos/stable/amd64/default/%s/rootfs.tar.xz"
                              % NEWEST) == 1


def test_plain_http_server_when_spelled_out(run_download, container: Container,
                                            image_server: ImageServer, gpg_keys: GpgKeys) -> None:
    res = run_download(*args_for(container, image_server.http_url, gpg_keys), *SINGLE)
    assert res.returncode == 0, res.stderr
    assert built(container) == "20261127_00:00"
    reqs = [r for r in image_server.requests if r.path != "/pks/lookup"]
    assert reqs and all(r.scheme == "http" for r in reqs)
    assert any(r.path.endswith("/rootfs.tar.xz") for r in reqs)


def test_bare_host_port_means_https_never_plain_http(run_download, container: Container,
                                                     image_server: ImageServer,
                                                     gpg_keys: GpgKeys,
                                                     env: Dict[str, str]) -> None:
    # host:port of the plain-HTTP side, without a scheme: the program must speak TLS to it
    bare = "127.0.0.1:%d" % image_server.http_port
    res = run_download(*args_for(container, bare, gpg_keys), *SINGLE, "--timeout", "2")
    assert res.returncode == 1, res.stdout
    assert error_lines(res), res.stderr
    no_traceback(res)
    assert [r for r in image_server.requests if r.scheme == "http" and r.path != "/pks/lookup"] == []
    assert_nothing_unpacked(container, env)


def test_https_to_https_redirect_followed(run_download, container_args: List[str],
                                          container: Container, image_server: ImageServer,
                                          catalog: Catalog) -> None:
    rootfs = catalog.image("single").entry.path + "rootfs.tar.xz"
    rule = image_server.add_rule(rootfs, support.redirect_to_path(
        image_server, "https", prefix=support.MIRROR_PREFIX))
    res = run_download(*container_args, *SINGLE)
    assert res.returncode == 0, res.stderr
    assert rule.hits == 1
    assert image_server.count(support.MIRROR_PREFIX + rootfs) == 1
    assert built(container) == "20261127_00:00"


def test_https_to_http_redirect_refused(run_download, container_args: List[str],
                                        container: Container, image_server: ImageServer,
                                        env: Dict[str, str], catalog: Catalog) -> None:
    rootfs = catalog.image("single").entry.path + "rootfs.tar.xz"
    image_server.add_rule(rootfs, support.redirect_to_path(image_server, "http"))
    res = run_download(*container_args, *SINGLE, "--timeout", "2")
    assert res.returncode == 1, res.stdout
    assert error_lines(res), res.stderr
    no_traceback(res)
    assert [r for r in image_server.requests if r.scheme == "http" and r.path != "/pks/lookup"] == []
    assert "Unpacking the rootfs" not in res.stdout
    assert_nothing_unpacked(container, env)


def test_user_agent_names_program_version_and_compat(run_download, container_args: List[str],
                                                     image_server: ImageServer) -> None:
    res = run_download(*container_args, *SINGLE)
    assert res.returncode == 0, res.stderr
    reqs = [r for r in image_server.requests if r.path != "/pks/lookup"]
    assert len(reqs) >= 6
    for r in reqs:
        ua = r.user_agent or ""
        assert re.search(r"lxc[-_]download", ua), ua
        assert re.search(r"\d+\.\d+", ua), ua
        assert "compat:7" in ua, ua


# ---------------------------------------------------------------------------
# retries, resume, timeouts
# ---------------------------------------------------------------------------

def test_two_server_errors_then_success_takes_three_attempts(
        run_download, container_args: List[str], container: Container,
        image_server: ImageServer, catalog: Catalog) -> None:
    rootfs = catalog.image("single").entry.path + "rootfs.tar.xz"
    rule = image_server.add_rule(rootfs, support.status(500), times=2)
    res = run_download(*container_args, *SINGLE)
    assert res.returncode == 0, res.stderr
    assert rule.hits == 2
    assert image_server.count(rootfs) == 3
    assert built(container) == "20261127_00:00"


def test_persistent_server_error_fails_naming_the_url(run_download, container_args: List[str],
                                                      container: Container,
                                                      image_server: ImageServer,
                                                      env: Dict[str, str],
                                                      catalog: Catalog) -> None:
    rootfs = catalog.image("single").entry.path + "rootfs.tar.xz"
    image_server.add_rule(rootfs, support.status(500))
    res = run_download(*container_args, *SINGLE)
    assert res.returncode == 1
    url = image_server.https_url + rootfs
    assert any(ln.startswith("ERROR: Failed to download " + url) for ln in error_lines(res)), \
        res.stderr
    no_traceback(res)
    assert image_server.count(rootfs) == 3
    assert_nothing_unpacked(container, env)


def test_cut_connection_resumes_with_range(run_download, container_args: List[str],
                                           container: Container, image_server: ImageServer,
                                           env: Dict[str, str], catalog: Catalog) -> None:
    img = catalog.image("single")
    rootfs = img.entry.path + "rootfs.tar.xz"
    cut = 300000
    assert img.rootfs_tar.stat().st_size > cut
    image_server.add_rule(rootfs, support.truncate(cut), times=1)
    res = run_download(*container_args, *SINGLE, "--timeout", "5")
    assert res.returncode == 0, res.stderr
    ranges = [r.range for r in image_server.requests if r.path == rootfs]
    assert ranges == [None, "bytes=%d-" % cut], ranges
    [cached] = cached_rootfs(env)
    assert cached.read_bytes() == img.rootfs_tar.read_bytes()
    assert built(container) == "20261127_00:00"


@pytest.mark.parametrize("where", ["mid-transfer", "before-response"])
def test_stalled_server_fails_in_bounded_time(run_download, container_args: List[str],
                                              container: Container, image_server: ImageServer,
                                              env: Dict[str, str], catalog: Catalog,
                                              where: str) -> None:
    rootfs = catalog.image("single").entry.path + "rootfs.tar.xz"
    after = 200000 if where == "mid-transfer" else None
    image_server.add_rule(rootfs, support.stall(15, after=after))
    start = time.monotonic()
    res = run_download(*container_args, *SINGLE, "--timeout", "2", timeout=120)
    elapsed = time.monotonic() - start
    assert elapsed < 30, elapsed
    assert res.returncode == 1, res.stdout
    url = image_server.https_url + rootfs
    assert any(url in ln for ln in error_lines(res)), res.stderr
    no_traceback(res)
    assert_nothing_unpacked(container, env)


# ---------------------------------------------------------------------------
# hostile index paths
# ---------------------------------------------------------------------------

HOSTILE_PATHS = {
    "absolute-url-elsewhere": "https://evil.invalid/images/single/one/amd64/default/x/",
    "absolute-url-same-server": "{https}/images/single/one/amd64/default/20261127_00:00/",
    "scheme-relative": "//127.0.0.1:{port}/images/single/one/amd64/default/20261127_00:00/",
    "climbs-out": "/../../x/",
    "climbs-out-of-prefix": "/../images/single/one/amd64/default/20261127_00:00/",
    "climbs-midway": "/images/../../../etc/",
}


@pytest.mark.parametrize("kind", sorted(HOSTILE_PATHS))
def test_index_paths_leaving_the_server_base_refused(run_download, container: Container,
                                                     env: Dict[str, str],
                                                     private_server: ImageServer,
                                                     gpg_keys: GpgKeys, kind: str) -> None:
    path = HOSTILE_PATHS[kind].format(https=private_server.https_url,
                                      port=private_server.https_port)
    entry = IndexEntry("single", "one", "amd64", "default", "20270101_00:00", path)
    prefix = support.MIRROR_PREFIX if kind == "climbs-out-of-prefix" else ""
    support.write_index(private_server.docroot, "system", [entry], True, gpg_keys, prefix=prefix)
    res = run_download(*args_for(container, private_server.host + prefix, gpg_keys), *SINGLE,
                       "--timeout", "2")
    assert res.returncode == 1, res.stdout
    assert error_lines(res), res.stderr
    no_traceback(res)
    paths = image_paths(private_server)
    assert not any("rootfs.tar.xz" in p or "meta.tar.xz" in p for p in paths), paths
    assert not any(".." in p.split("/") for p in paths), paths
    assert_nothing_unpacked(container, env)


# ---------------------------------------------------------------------------
# the index is read as a stream
# ---------------------------------------------------------------------------

MEMORY_LIMIT_KB = 150 * 1024  # a validated --list needs ~60 MiB of address space
FILLER_LINE = "# " + "x" * 1021 + "\n"  # 1 KiB, malformed: must be skipped


def _limited(limit_kb: int, *cmd: str) -> List[str]:
    return ["sh", "-c", 'ulimit -v %d && exec "$0" "$@"' % limit_kb, *cmd]


def test_index_read_as_a_stream_of_lines(env: Dict[str, str], private_server: ImageServer,
                                         gpg_keys: GpgKeys, catalog: Catalog) -> None:
    """An index bigger than the process may hold in memory still lists: it is never
    read whole (the control run shows that reading it whole does not fit)."""
    index = private_server.docroot / INDEX7.lstrip("/")
    good = catalog.image("single").entry
    lines = 200 * 1024  # 200 MiB of filler, then the one real line
    with open(str(index), "w") as f:
        block = FILLER_LINE * 1024
        for _ in range(lines // 1024):
            f.write(block)
        f.write(good.line() + "\n")
    try:
        gpg_keys.sign(index)
        assert index.stat().st_size > MEMORY_LIMIT_KB * 1024
        control = support.run_cmd(_limited(MEMORY_LIMIT_KB, sys.executable, "-c",
                                           "import sys; open(sys.argv[1]).read().splitlines()",
                                           str(index)), env)
        assert control.returncode != 0 and "MemoryError" in control.stderr
        res = support.run_cmd(_limited(MEMORY_LIMIT_KB, sys.executable, str(support.SCRIPT),
                                       "--list", "--server", private_server.host,
                                       "--keyid", gpg_keys.test_fpr,
                                       "--pubkey", str(gpg_keys.test_pubkey)), env, timeout=300)
    finally:
        index.unlink()  # 200 MiB: don't leave it in pytest's kept temp dirs
    assert res.returncode == 0, res.stderr
    no_traceback(res)
    assert rows(res.stdout) == [[good.dist, good.release, good.arch, good.variant, good.build]]
