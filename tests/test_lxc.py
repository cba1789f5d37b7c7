"""Real LXC: lxc_download.py as the template of `lxc-create`, and the container it makes
started with `lxc-execute`.

Covers SPEC §1 (the template interface: `lxc-create -t /path/to/lxc_download.py -- ...`
as root and as an unprivileged user, and running it by hand with --name/--path/--rootfs),
§3 (system or user mode: which index, which meta files, which cache base, and the refusal
in a user namespace without a map), §9 (a second create served from the cache) and the
parts of §10 a running container depends on (lxc.uts.name, templated /etc/hostname,
numeric owners through the id map), i.e. issue 2's "Template interface".

The host is prepared by tests/lxc_host_setup.sh (run here once, as root, when the test
user is missing); see tests/lxc_helpers.py for what that host needs and why.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Tuple

import pytest

import lxc_helpers
import support
from support import Catalog, GpgKeys, ImageServer, Pki

SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
IMAGE = ["-d", "testos", "-r", "stable", "-a", "amd64"]
IMAGE_CACHE = Path("download/testos/stable/amd64/default")
UID1000_FILE = "home/user/file.txt"  # owned 1000:1000 in support's images
TEMPLATE_CONFIG = "/usr/share/lxc/config"
COMMON_INCLUDE = "lxc.include = %s/common.conf" % TEMPLATE_CONFIG
USERNS_INCLUDE = "lxc.include = %s/userns.conf" % TEMPLATE_CONFIG
# A uid/gid range on the host for the "root in a user namespace" case (not lxcuser's).
NESTED_SUBID_BASE = 300000

NameFactory = Callable[..., str]


# ---------------------------------------------------------------------------
# Host, shared files, container bookkeeping
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lxc_host() -> None:
    """Root, the LXC tools, and the unprivileged test user (set up here if missing)."""
    if os.geteuid() != 0:
        pytest.fail("the LXC tests must run as root")
    for tool in ("lxc-create", "lxc-execute", "lxc-destroy", "unshare", "runuser"):
        assert shutil.which(tool, path=SYSTEM_PATH), "%s is not installed" % tool
    try:
        pwd.getpwnam(lxc_helpers.TEST_USER)
        ready = os.path.isfile(lxc_helpers.user_default_conf())
    except KeyError:
        ready = False
    if not ready:
        setup = subprocess.run(["bash", str(Path(__file__).with_name("lxc_host_setup.sh"))],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               timeout=300)
        assert setup.returncode == 0, "lxc_host_setup.sh failed:\n" + setup.stdout
    lxc_helpers.host_supports_unprivileged.cache_clear()
    ok, why = lxc_helpers.host_supports_unprivileged()
    assert ok, why


@pytest.fixture(scope="module")
def shared(lxc_host: None, pki: Pki) -> Iterator[Dict[str, str]]:
    """A 0755 directory under /tmp with what the test user's lxc-create must read: an
    executable copy of lxc_download.py and the test CA (pytest's tmp_path is 0700)."""
    d = tempfile.mkdtemp(prefix="lxdl-shared-", dir="/tmp")
    os.chmod(d, 0o755)
    template = os.path.join(d, "lxc_download.py")
    shutil.copyfile(str(support.SCRIPT), template)
    os.chmod(template, 0o755)
    ca = os.path.join(d, "ca.pem")
    shutil.copyfile(str(pki.ca_cert), ca)
    os.chmod(ca, 0o644)
    yield {"dir": d, "template": template, "ca": ca}
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def new_name(lxc_host: None) -> Iterator[NameFactory]:
    """new_name(tag, unprivileged=False) -> a unique container name, destroyed at teardown
    (pass or fail)."""
    made: List[Tuple[str, bool]] = []

    def new(tag: str, unprivileged: bool = False) -> str:
        name = "lxdl-%s-%s" % (tag, uuid.uuid4().hex[:8])
        made.append((name, unprivileged))
        return name

    yield new
    for name, unprivileged in reversed(made):
        lxc_helpers.lxc_destroy(name, unprivileged=unprivileged)


def _root_env(monkeypatch: pytest.MonkeyPatch, ca: str, server: ImageServer,
              cache: Path, home: Path) -> None:
    """The environment root's lxc-create hands to the template (it passes its own on)."""
    for var in support.PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.upper(), raising=False)
    for var in ("GNUPGHOME", "LXC_TEMPLATE_CONFIG", "LXC_HOOK_DIR"):
        monkeypatch.delenv(var, raising=False)
    home.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("PATH", SYSTEM_PATH)  # `env python3` -> Debian's /usr/bin/python3
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("SSL_CERT_FILE", ca)
    monkeypatch.setenv("DOWNLOAD_KEYSERVER", server.keyserver_url)
    monkeypatch.setenv("LXC_CACHE_PATH", str(cache))


def _template_args(server: ImageServer, keys: GpgKeys) -> List[str]:
    return ["--server", server.host, "--keyid", keys.test_fpr] + IMAGE


def _out(res: subprocess.CompletedProcess) -> str:
    return "rc=%s\nstdout:\n%s\nstderr:\n%s" % (res.returncode, res.stdout, res.stderr)


def _lxc_create_as_user(name: str, template: str, template_args: List[str],
                        env_extra: Dict[str, str]) -> subprocess.CompletedProcess:
    """lxc_helpers.lxc_create(unprivileged=True), plus an environment for the template
    (the helper's lxc_create has no env_extra; run_as_user has)."""
    lines = ["lxc.include = %s" % lxc_helpers.user_default_conf(), "lxc.net.0.type = empty"]
    fd, conf = tempfile.mkstemp(prefix="lxc-test-", suffix=".conf", dir="/tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.chmod(conf, 0o644)
        cmd = ["lxc-create", "-n", name, "-t", template, "-f", conf, "--"] + template_args
        return lxc_helpers.run_as_user(cmd, env_extra=env_extra, timeout=600)
    finally:
        os.unlink(conf)


def _execute(name: str, cmd: List[str], unprivileged: bool = False) -> str:
    res = lxc_helpers.lxc_execute(name, cmd, unprivileged=unprivileged)
    assert res.returncode == 0, _out(res)
    return res.stdout.strip()


def _check_running_container(name: str, unprivileged: bool) -> None:
    """hostname, templated /etc/hostname and the uid-1000 file, seen from inside."""
    assert _execute(name, ["hostname"], unprivileged) == name
    assert _execute(name, ["cat", "/etc/hostname"], unprivileged) == name
    assert _execute(name, ["stat", "-c", "%u:%g", "/" + UID1000_FILE], unprivileged) == "1000:1000"


def _idmap_bases() -> Tuple[int, int]:
    """Host uid/gid that the test user's containers map their root to (default.conf)."""
    bases = {}
    with open(lxc_helpers.user_default_conf()) as f:
        for line in f:
            key, _, value = line.partition("=")
            fields = value.split()
            if key.strip() == "lxc.idmap" and len(fields) == 4 and fields[1] == "0":
                bases[fields[0]] = int(fields[2])
    return bases["u"], bases["g"]


def _newest(catalog: Catalog) -> support.PublishedImage:
    return catalog.image("testos", "stable", "amd64")


# ---------------------------------------------------------------------------
# Privileged
# ---------------------------------------------------------------------------

def test_privileged_lxc_create_makes_a_container_that_starts(
        new_name: NameFactory, shared: Dict[str, str], image_server: ImageServer,
        gpg_keys: GpgKeys, catalog: Catalog, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    _root_env(monkeypatch, shared["ca"], image_server, cache, tmp_path / "home")
    name = new_name("p")
    res = lxc_helpers.lxc_create(name, shared["template"], _template_args(image_server, gpg_keys))
    assert res.returncode == 0, _out(res)
    for line in ("Setting up the GPG keyring", "Downloading the image index",
                 "Downloading the rootfs", "Downloading the metadata",
                 "The image cache is now ready", "Unpacking the rootfs"):
        assert line in res.stdout.splitlines(), _out(res)
    # lxc-create passed its environment on: LXC_CACHE_PATH chose the cache, SSL_CERT_FILE
    # let the HTTPS fetches through, DOWNLOAD_KEYSERVER served the key.
    newest = _newest(catalog)
    assert (cache / IMAGE_CACHE / "build_id").read_text().strip() == newest.entry.build
    assert image_server.count("/meta/1.0/index-system.7") == 1
    assert image_server.count("/meta/1.0/index-user*") == 0
    assert image_server.count(newest.entry.path + "rootfs.tar.xz") == 1
    assert image_server.count("/pks/lookup") >= 1

    path = Path(lxc_helpers.container_dir(name, unprivileged=False))
    config = (path / "config").read_text()
    assert "lxc.uts.name = %s\n" % name in config.splitlines(keepends=True)
    assert COMMON_INCLUDE in config and USERNS_INCLUDE not in config  # system: `config`
    order = [config.index(h) for h in ("# Distribution configuration",
                                       "# Container specific configuration",
                                       "# Network configuration")]
    assert order == sorted(order), config
    st = os.stat(str(path / "rootfs" / UID1000_FILE))
    assert (st.st_uid, st.st_gid) == (1000, 1000)

    _check_running_container(name, unprivileged=False)
    assert _execute(name, ["cat", "/etc/build"]) == newest.entry.build


def test_second_privileged_create_uses_local_cache_without_rootfs_download(
        new_name: NameFactory, shared: Dict[str, str], image_server: ImageServer,
        gpg_keys: GpgKeys, catalog: Catalog, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    _root_env(monkeypatch, shared["ca"], image_server, tmp_path / "cache", tmp_path / "home")
    args = _template_args(image_server, gpg_keys)
    first, second = new_name("c1"), new_name("c2")
    t0 = time.monotonic()
    res = lxc_helpers.lxc_create(first, shared["template"], args)
    fresh = time.monotonic() - t0
    assert res.returncode == 0, _out(res)
    assert "The image cache is now ready" in res.stdout.splitlines()
    assert image_server.count("*/rootfs.tar.xz") == 1

    image_server.clear_log()
    t0 = time.monotonic()
    res = lxc_helpers.lxc_create(second, shared["template"], args)
    cached = time.monotonic() - t0
    assert res.returncode == 0, _out(res)
    assert "Using image from local cache" in res.stdout.splitlines(), _out(res)
    assert "Downloading the rootfs" not in res.stdout
    assert image_server.count("*/rootfs.tar.xz*") == 0
    assert image_server.count("*/meta.tar.xz*") == 0
    print("\nlxc-create wall time (privileged, testos image): fresh cache %.2f s, "
          "cached %.2f s" % (fresh, cached))
    _check_running_container(second, unprivileged=False)


def test_lxc_create_accepts_the_repository_file_itself_as_template(
        new_name: NameFactory, shared: Dict[str, str], image_server: ImageServer,
        gpg_keys: GpgKeys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 2: `lxc-create -n c1 -t $PWD/lxc_download.py -- ...` works as the repo ships
    it (LXC refuses a template that is not executable: "Bad template pathname")."""
    _root_env(monkeypatch, shared["ca"], image_server, tmp_path / "cache", tmp_path / "home")
    name = new_name("repo")
    res = lxc_helpers.lxc_create(name, str(support.SCRIPT), _template_args(image_server, gpg_keys))
    assert res.returncode == 0, _out(res)
    assert _execute(name, ["hostname"]) == name


def test_run_by_hand_into_var_lib_lxc_then_lxc_execute_finds_it(
        new_name: NameFactory, run_download: Callable[..., subprocess.CompletedProcess],
        image_server: ImageServer, gpg_keys: GpgKeys) -> None:
    name = new_name("h")
    container = support.make_container(Path(lxc_helpers.default_lxcpath(False)), name)
    res = run_download(*container.args(image_server, gpg_keys), *IMAGE)
    assert res.returncode == 0, _out(res)
    assert "Unpacking the rootfs" in res.stdout.splitlines()
    config = container.config.read_text()
    assert "lxc.uts.name = %s\n" % name in config.splitlines(keepends=True)
    assert "lxc.rootfs.path = dir:%s\n" % container.rootfs in config
    assert "# Network configuration\nlxc.net.0.type = empty\n" in config
    _check_running_container(name, unprivileged=False)


# ---------------------------------------------------------------------------
# Unprivileged
# ---------------------------------------------------------------------------

@pytest.fixture
def user_image_cache(lxc_host: None) -> Iterator[Path]:
    """The test user's cache of the testos image, absent before and removed after."""
    home = Path(pwd.getpwnam(lxc_helpers.TEST_USER).pw_dir)
    dist_dir = home / ".cache/lxc/download/testos"
    shutil.rmtree(str(dist_dir), ignore_errors=True)
    yield home / ".cache/lxc" / IMAGE_CACHE
    shutil.rmtree(str(dist_dir), ignore_errors=True)


def test_unprivileged_lxc_create_uses_user_index_user_cache_and_id_map(
        new_name: NameFactory, shared: Dict[str, str], image_server: ImageServer,
        gpg_keys: GpgKeys, catalog: Catalog, user_image_cache: Path) -> None:
    user = pwd.getpwnam(lxc_helpers.TEST_USER)
    name = new_name("u", unprivileged=True)
    env_extra = {"SSL_CERT_FILE": shared["ca"], "DOWNLOAD_KEYSERVER": image_server.keyserver_url}
    res = _lxc_create_as_user(name, shared["template"], _template_args(image_server, gpg_keys),
                              env_extra)
    assert res.returncode == 0, _out(res)
    assert "The image cache is now ready" in res.stdout.splitlines(), _out(res)
    assert "Unpacking the rootfs" in res.stdout.splitlines()

    # user mode: index-user, cache under ~/.cache/lxc, handed to the user (--mapped-uid/gid)
    assert image_server.count("/meta/1.0/index-user.7") == 1
    assert image_server.count("/meta/1.0/index-system*") == 0
    newest = _newest(catalog)
    assert (user_image_cache / "build_id").read_text().strip() == newest.entry.build
    for p in (user_image_cache.parents[4], user_image_cache, user_image_cache / "rootfs.tar.xz",
              user_image_cache / "build_id", user_image_cache / "config-user"):
        st = os.lstat(str(p))
        assert (st.st_uid, st.st_gid) == (user.pw_uid, user.pw_gid), p

    path = Path(lxc_helpers.container_dir(name, unprivileged=True))
    config = (path / "config").read_text()
    assert USERNS_INCLUDE + "\n" in config, config  # the relevant `config-user`
    assert COMMON_INCLUDE in config
    assert "lxc.uts.name = %s\n" % name in config.splitlines(keepends=True)
    st = os.stat(str(path / "fstab"))
    assert (st.st_uid, st.st_gid) == (user.pw_uid, user.pw_gid)  # §10.6 chown

    uid_base, gid_base = _idmap_bases()
    st = os.stat(str(path / "rootfs" / UID1000_FILE))
    assert (st.st_uid, st.st_gid) == (uid_base + 1000, gid_base + 1000)
    assert not os.path.lexists(str(path / "rootfs/dev/null"))  # excludes-user

    _check_running_container(name, unprivileged=True)


# ---------------------------------------------------------------------------
# Mode detection without LXC (§3)
# ---------------------------------------------------------------------------

def test_root_in_user_namespace_mapping_host_root_once_reads_user_index(
        env: Dict[str, str], image_server: ImageServer, gpg_keys: GpgKeys) -> None:
    """uid_map `0 0 1` (real root inside a user namespace): mode user, no map needed."""
    cmd = ["unshare", "--user", "--map-user=0", "--map-group=0", "--",
           sys.executable, "-c", "import sys; sys.stdout.write(open('/proc/self/uid_map').read())"]
    probe = support.run_cmd(cmd, env)
    assert probe.stdout.split() == ["0", "0", "1"], _out(probe)
    cmd = ["unshare", "--user", "--map-user=0", "--map-group=0", "--", sys.executable,
           str(support.SCRIPT), "--list", "--server", image_server.host, "--keyid", gpg_keys.test_fpr]
    res = support.run_cmd(cmd, env)
    assert res.returncode == 0, _out(res)
    assert "ERROR" not in res.stderr
    assert any(line.split()[:2] == ["testos", "stable"] for line in res.stdout.splitlines())
    assert image_server.count("/meta/1.0/index-user.7") == 1
    assert image_server.count("/meta/1.0/index-system*") == 0


def _run_in_nested_userns(cmd: List[str], env: Dict[str, str], var_cache: Path,
                          timeout: float = 300) -> subprocess.CompletedProcess:
    """Run cmd as root of a new user namespace whose uid/gid map is `0 0 1` (host root,
    once) plus `1 <NESTED_SUBID_BASE> 65535`, in a private mount namespace where
    /var/cache/lxc is var_cache. The maps are written from here, as host root."""
    inner = 'read go && exec "$@"'
    outer = 'mount --bind "$0" /var/cache/lxc && exec unshare --user -- sh -c \'%s\' sh "$@"' % inner
    proc = subprocess.Popen(["unshare", "--mount", "--", "sh", "-c", outer, str(var_cache)] + cmd,
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        ours = os.readlink("/proc/self/ns/user")
        deadline = time.monotonic() + 20
        while True:
            try:
                if os.readlink("/proc/%d/ns/user" % proc.pid) != ours:
                    break
            except OSError:
                pass
            assert proc.poll() is None, "namespace setup failed: %s" % proc.stderr.read()
            assert time.monotonic() < deadline, "no user namespace appeared"
            time.sleep(0.02)
        id_map = "0 0 1\n1 %d 65535\n" % NESTED_SUBID_BASE
        for kind in ("uid_map", "gid_map"):
            with open("/proc/%d/%s" % (proc.pid, kind), "w") as f:
                f.write(id_map)
        out, err = proc.communicate("go\n", timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_root_in_user_namespace_creates_with_user_meta_and_system_cache(
        env: Dict[str, str], image_server: ImageServer, gpg_keys: GpgKeys,
        container: support.Container, catalog: Catalog, tmp_path: Path) -> None:
    """A line `0 0 1` in uid_map: index-user and config-user, cache in /var/cache/lxc."""
    var_cache = tmp_path / "var-cache-lxc"
    var_cache.mkdir()
    env = dict(env)
    del env["LXC_CACHE_PATH"]
    cmd = [sys.executable, str(support.SCRIPT)] + container.args(image_server, gpg_keys) + IMAGE
    res = _run_in_nested_userns(cmd, env, var_cache)
    assert res.returncode == 0, _out(res)
    assert "The image cache is now ready" in res.stdout.splitlines(), _out(res)
    assert image_server.count("/meta/1.0/index-user.7") == 1
    assert image_server.count("/meta/1.0/index-system*") == 0
    assert (var_cache / IMAGE_CACHE / "build_id").read_text().strip() == \
        _newest(catalog).entry.build
    assert not (Path(env["HOME"]) / ".cache").exists()
    config = container.config.read_text()
    assert USERNS_INCLUDE + "\n" in config and "lxc.uts.name = c1\n" in config
    assert not os.path.lexists(str(container.rootfs / "dev/null"))  # excludes-user
    st = os.stat(str(container.rootfs / UID1000_FILE))  # ns uid 1000 -> host base + 999
    assert (st.st_uid, st.st_gid) == (NESTED_SUBID_BASE + 999,) * 2
    assert (container.rootfs / "etc/hostname").read_text() == "c1\n"


def test_user_namespace_without_mapped_uid_is_refused(
        shared: Dict[str, str], image_server: ImageServer, gpg_keys: GpgKeys) -> None:
    """`unshare -U -r` as an ordinary user maps only that user: without --mapped-uid the
    program cannot tell whose the files are and must refuse, before any network use."""
    base = ["unshare", "-U", "-r", "/usr/bin/python3", shared["template"]]
    server = ["--server", image_server.host, "--keyid", gpg_keys.test_fpr]
    env_extra = {"SSL_CERT_FILE": shared["ca"], "DOWNLOAD_KEYSERVER": image_server.keyserver_url}
    where = os.path.join(shared["dir"], "never")
    container = ["--name", "never", "--path", where, "--rootfs", where + "/rootfs"]
    for extra in ([], ["--mapped-uid", "-1", "--mapped-gid", "-1"], ["--mapped-uid=-1"]):
        res = lxc_helpers.run_as_user(base + container + server + IMAGE + extra,
                                      env_extra=env_extra, timeout=120)
        assert res.returncode == 1, _out(res)
        assert "ERROR: In a user namespace without a map" in res.stderr, _out(res)
        assert "Traceback" not in res.stderr
    assert image_server.requests == []
    assert not os.path.lexists(where)
    # the same namespace with a map is accepted: user mode, index-user
    res = lxc_helpers.run_as_user(base + ["--list", "--mapped-uid", "0", "--mapped-gid", "0"]
                                  + server, env_extra=env_extra, timeout=120)
    assert res.returncode == 0, _out(res)
    assert image_server.count("/meta/1.0/index-user.7") == 1
    assert image_server.count("/meta/1.0/index-system*") == 0
