"""The image cache through the real program (SPEC §3 cache base, §9; issue 3's cache items).

Layout `<base>/download/<dist>/<release>/<arch>/<variant>/` shared with the Debian shell
template (either one's cache serves the other), reuse without any download, --flush-cache,
--force-cache, expiry (the image's `expiry` and the 30-day cap on `build_id`), newer builds,
refusal of a rollback to an older build, the cache base (LXC_CACHE_PATH, /var/cache/lxc as
root, $HOME/.cache/lxc in an unprivileged user namespace), a per-image lock (4 creators at
once download once), and atomicity under SIGKILL and SIGTERM.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

import lxc_helpers
import support
from support import Catalog, Container, GpgKeys, ImageServer

TESTOS = ("-d", "testos", "-r", "stable", "-a", "amd64")
SINGLE = ("-d", "single", "-r", "one", "-a", "amd64")
OLD_BUILD = "20261101_00:00"
NEW_BUILD = "20261127_05:24"
MARKER = support.RUN_MARKER
pytestmark = pytest.mark.usefixtures("reap_our_gpg_daemons")
processes_with_marker = support.processes_with_marker
GPG_HOME_GLOB = "/tmp/lxc-gpg.*"
DAY = 24 * 3600


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def show(res: subprocess.CompletedProcess) -> str:
    return "rc=%s\n--- stdout\n%s\n--- stderr\n%s" % (res.returncode, res.stdout, res.stderr)


def out_lines(res: subprocess.CompletedProcess) -> List[str]:
    return res.stdout.splitlines()


def errors(res: subprocess.CompletedProcess) -> List[str]:
    return [ln for ln in res.stderr.splitlines() if ln.startswith("ERROR:")]


def warnings(res: subprocess.CompletedProcess) -> List[str]:
    return [ln for ln in res.stderr.splitlines() if ln.startswith("WARNING:")]


def cache_of(base: Path, dist: str = "testos", release: str = "stable", arch: str = "amd64",
             variant: str = "default") -> Path:
    return Path(base) / "download" / dist / release / arch / variant


def env_cache(env: Dict[str, str], *image: str) -> Path:
    return cache_of(Path(env["LXC_CACHE_PATH"]), *image)


def another(tmp_path: Path, name: str) -> Container:
    return support.make_container(tmp_path / "containers", name)


def image_rel(catalog: Catalog, dist: str = "testos", build: Optional[str] = None) -> str:
    """Server path of an image's directory, e.g. /images/testos/.../<build>/."""
    return catalog.image(dist, build=build).entry.path


def set_expiry(cache: Path, when: float) -> None:
    (cache / "expiry").write_text("%d\n" % int(when))


def partials(cache: Path) -> List[str]:
    """Staging or moved-aside siblings of a cache directory (never the lock file)."""
    if not cache.parent.is_dir():
        return []
    return sorted(n for n in os.listdir(str(cache.parent))
                  if n.startswith("." + cache.name + ".") and not n.endswith(".lock"))


def publish_index(server: ImageServer, keys: GpgKeys, entries: List[support.IndexEntry]) -> None:
    """Replace the server's compat-7 system index with these entries, validly signed."""
    support.write_index(server.docroot, "system", entries, compat=True, keys=keys)





def start_download(args: List[str], env: Dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(support.SCRIPT), *args], env=env,
                            cwd=str(cwd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_until_stalled(proc: subprocess.Popen, server: ImageServer, rootfs_path: str,
                       timeout: float = 60) -> None:
    """The rootfs request has reached the server, which then stalls mid-file."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the program ended before the stall: %r" % (
            proc.communicate(),)
        if server.count(rootfs_path) >= 1:
            time.sleep(1)  # the first half of the file is on its way, the rest never comes
            assert proc.poll() is None, "the program ended during the stall: %r" % (
                proc.communicate(),)
            return
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("the rootfs transfer never started: %s" % server.paths())


def assert_whole_or_absent(cache: Path) -> None:
    """Never a partial cache: either nothing at the cache path, or a complete one."""
    if os.path.lexists(str(cache)):
        assert (cache / "build_id").is_file(), os.listdir(str(cache))
        assert (cache / "rootfs.tar.xz").is_file() and (cache / "config").is_file()


# ---------------------------------------------------------------------------
# layout and reuse
# ---------------------------------------------------------------------------

def test_cache_layout_holds_rootfs_meta_build_id_and_signatures(
        run_download, container_args, env, catalog: Catalog) -> None:
    res = run_download(*container_args, *TESTOS)
    assert res.returncode == 0, show(res)
    cache = env_cache(env)
    img = catalog.image("testos", "stable", "amd64")
    assert (cache / "build_id").read_text().strip() == NEW_BUILD
    assert (cache / "rootfs.tar.xz").read_bytes() == img.rootfs_tar.read_bytes()
    assert (cache / "rootfs.tar.xz.asc").read_bytes() == \
        (img.dir / "rootfs.tar.xz.asc").read_bytes()
    assert (cache / "meta.tar.xz.asc").read_bytes() == (img.dir / "meta.tar.xz.asc").read_bytes()
    for name, text in support.default_meta_files().items():
        if name == "expiry":
            assert int((cache / name).read_text()) > time.time()
        else:
            assert (cache / name).read_text() == text, name
    assert partials(cache) == []
    lines = out_lines(res)
    for progress in ("Downloading the image index", "Downloading the rootfs",
                     "Downloading the metadata", "The image cache is now ready",
                     "Unpacking the rootfs"):
        assert progress in lines, res.stdout


def test_second_create_uses_cache_without_any_download(run_download, container_args, env,
                                                       image_server: ImageServer,
                                                       catalog: Catalog, gpg_keys: GpgKeys,
                                                       tmp_path: Path) -> None:
    first = run_download(*container_args, *TESTOS)
    assert first.returncode == 0, show(first)
    rootfs = image_rel(catalog) + "rootfs.tar.xz"
    assert image_server.count(rootfs) == 1
    image_server.clear_log()
    c2 = another(tmp_path, "c2")
    second = run_download(*c2.args(image_server, gpg_keys), *TESTOS)
    assert second.returncode == 0, show(second)
    assert "Using image from local cache" in out_lines(second)
    assert "Downloading the rootfs" not in second.stdout
    assert "Downloading the image index" not in second.stdout
    assert image_server.paths() == []  # no index, no rootfs, no keyserver
    assert (c2.rootfs / "etc/build").read_text() == NEW_BUILD + "\n"
    assert (c2.rootfs / "etc/hostname").read_text() == "c2\n"


def test_flush_cache_removes_it_and_downloads_again(run_download, container_args, env,
                                                    image_server: ImageServer,
                                                    catalog: Catalog) -> None:
    assert run_download(*container_args, *TESTOS).returncode == 0
    cache = env_cache(env)
    (cache / "stale-file").write_text("must go with the flush\n")
    res = run_download(*container_args, *TESTOS, "--flush-cache")
    assert res.returncode == 0, show(res)
    lines = out_lines(res)
    assert "Flushing the cache..." in lines
    assert lines.index("Flushing the cache...") < lines.index("Downloading the rootfs")
    assert image_server.count(image_rel(catalog) + "rootfs.tar.xz") == 2
    assert not (cache / "stale-file").exists()
    assert (cache / "build_id").read_text().strip() == NEW_BUILD


def test_force_cache_uses_expired_cache_without_downloading(run_download, container_args,
                                                            env, image_server: ImageServer,
                                                            tmp_path: Path) -> None:
    assert run_download(*container_args, *TESTOS).returncode == 0
    set_expiry(env_cache(env), time.time() - DAY)
    image_server.clear_log()
    res = run_download(*container_args, *TESTOS, "--force-cache")
    assert res.returncode == 0, show(res)
    assert "Using image from local cache" in out_lines(res)
    assert "The cached copy has expired, re-downloading..." not in res.stdout
    assert image_server.paths() == []


def test_expired_cache_rechecks_index_and_keeps_same_build(run_download, container_args,
                                                           env, image_server: ImageServer,
                                                           catalog: Catalog) -> None:
    assert run_download(*container_args, *TESTOS).returncode == 0
    set_expiry(env_cache(env), time.time() - 60)
    image_server.clear_log()
    res = run_download(*container_args, *TESTOS)
    assert res.returncode == 0, show(res)
    lines = out_lines(res)
    expected = ["The cached copy has expired, re-downloading...",
                "The cache is already up to date", "Using image from local cache"]
    assert [ln for ln in lines if ln in expected] == expected, res.stdout
    assert image_server.count("/meta/1.0/index-system.7") == 1
    assert image_server.count("*/rootfs.tar.xz") == 0
    assert "Downloading the rootfs" not in lines


def test_build_id_older_than_30_days_counts_as_expired(run_download, container_args, env,
                                                       image_server: ImageServer) -> None:
    assert run_download(*container_args, *TESTOS).returncode == 0
    cache = env_cache(env)
    set_expiry(cache, time.time() + 365 * DAY)  # the image itself says: good for a year
    old = time.time() - 31 * DAY
    os.utime(str(cache / "build_id"), (old, old))
    image_server.clear_log()
    res = run_download(*container_args, *TESTOS)
    assert res.returncode == 0, show(res)
    lines = out_lines(res)
    assert "The cached copy has expired, re-downloading..." in lines, res.stdout
    assert "The cache is already up to date" in lines
    assert image_server.count("/meta/1.0/index-system.7") == 1
    assert image_server.count("*/rootfs.tar.xz") == 0


def test_build_id_younger_than_30_days_is_still_fresh(run_download, container_args, env,
                                                      image_server: ImageServer) -> None:
    assert run_download(*container_args, *TESTOS).returncode == 0
    recent = time.time() - 29 * DAY
    os.utime(str(env_cache(env) / "build_id"), (recent, recent))
    image_server.clear_log()
    res = run_download(*container_args, *TESTOS)
    assert res.returncode == 0, show(res)
    assert "The cached copy has expired, re-downloading..." not in res.stdout
    assert image_server.paths() == []


def test_expired_cache_downloads_newer_build(run_download, env, private_server: ImageServer,
                                             catalog: Catalog, gpg_keys: GpgKeys,
                                             tmp_path: Path) -> None:
    env["DOWNLOAD_KEYSERVER"] = private_server.keyserver_url
    old = catalog.image("testos", build=OLD_BUILD).entry
    new = catalog.image("testos", build=NEW_BUILD).entry
    publish_index(private_server, gpg_keys, [old])
    c1 = another(tmp_path, "c1")
    first = run_download(*c1.args(private_server, gpg_keys), *TESTOS)
    assert first.returncode == 0, show(first)
    cache = env_cache(env)
    assert (cache / "build_id").read_text().strip() == OLD_BUILD
    publish_index(private_server, gpg_keys, [old, new])
    set_expiry(cache, time.time() - 60)
    private_server.clear_log()
    c2 = another(tmp_path, "c2")
    res = run_download(*c2.args(private_server, gpg_keys), *TESTOS)
    assert res.returncode == 0, show(res)
    lines = out_lines(res)
    assert "The cached copy has expired, re-downloading..." in lines
    assert "Downloading the rootfs" in lines and "The image cache is now ready" in lines
    assert private_server.count(new.path + "rootfs.tar.xz") == 1
    assert private_server.count(old.path + "rootfs.tar.xz") == 0
    assert (cache / "build_id").read_text().strip() == NEW_BUILD
    assert (c2.rootfs / "etc/build").read_text() == NEW_BUILD + "\n"
    assert partials(cache) == []


def test_signed_index_offering_older_build_does_not_roll_back_cache(
        run_download, env, private_server: ImageServer, catalog: Catalog,
        gpg_keys: GpgKeys, tmp_path: Path) -> None:
    env["DOWNLOAD_KEYSERVER"] = private_server.keyserver_url
    old = catalog.image("testos", build=OLD_BUILD).entry
    c1 = another(tmp_path, "c1")
    first = run_download(*c1.args(private_server, gpg_keys), *TESTOS)
    assert first.returncode == 0, show(first)
    cache = env_cache(env)
    assert (cache / "build_id").read_text().strip() == NEW_BUILD
    cached_rootfs = (cache / "rootfs.tar.xz").read_bytes()
    publish_index(private_server, gpg_keys, [old])  # a replayed, validly signed old index
    set_expiry(cache, time.time() - 60)  # so the index is consulted again
    private_server.clear_log()
    c2 = another(tmp_path, "c2")
    res = run_download(*c2.args(private_server, gpg_keys), *TESTOS)
    assert res.returncode == 0, show(res)
    assert private_server.count("/meta/1.0/index-system.7") == 1
    warn = warnings(res)
    assert len(warn) == 1 and OLD_BUILD in warn[0], show(res)
    assert "Using image from local cache" in out_lines(res)
    assert private_server.count("*/rootfs.tar.xz") == 0
    assert (cache / "build_id").read_text().strip() == NEW_BUILD
    assert (cache / "rootfs.tar.xz").read_bytes() == cached_rootfs
    assert (c2.rootfs / "etc/build").read_text() == NEW_BUILD + "\n"


# ---------------------------------------------------------------------------
# shared with the shell template
# ---------------------------------------------------------------------------

def test_program_uses_cache_made_by_shell_template(run_download, run_shell_template, env,
                                                   image_server: ImageServer,
                                                   gpg_keys: GpgKeys, catalog: Catalog,
                                                   tmp_path: Path) -> None:
    c1, c2 = another(tmp_path, "c1"), another(tmp_path, "c2")
    shell = run_shell_template(*c1.shell_args(image_server), *SINGLE, env=env)
    assert shell.returncode == 0, show(shell)
    cache = env_cache(env, "single", "one", "amd64")
    assert (cache / "build_id").read_text().strip() == "20261127_00:00"
    assert image_server.count(image_rel(catalog, "single") + "rootfs.tar.xz") == 1
    image_server.clear_log()
    res = run_download(*c2.args(image_server, gpg_keys), *SINGLE)
    assert res.returncode == 0, show(res)
    assert "Using image from local cache" in out_lines(res)
    assert image_server.paths() == []
    assert (c2.rootfs / "etc/build").read_text() == "20261127_00:00\n"
    assert (c2.rootfs / "etc/hostname").read_text() == "c2\n"


def test_shell_template_uses_cache_made_by_program(run_download, run_shell_template, env,
                                                   image_server: ImageServer,
                                                   gpg_keys: GpgKeys, catalog: Catalog,
                                                   tmp_path: Path) -> None:
    c1, c2 = another(tmp_path, "c1"), another(tmp_path, "c2")
    res = run_download(*c1.args(image_server, gpg_keys), *SINGLE)
    assert res.returncode == 0, show(res)
    image_server.clear_log()
    shell = run_shell_template(*c2.shell_args(image_server), *SINGLE, env=env)
    assert shell.returncode == 0, show(shell)
    assert "Using image from local cache" in out_lines(shell)
    assert image_server.paths() == []
    assert (c2.rootfs / "etc/build").read_text() == "20261127_00:00\n"
    assert (c2.rootfs / "etc/hostname").read_text() == "c2\n"


# ---------------------------------------------------------------------------
# where the cache lives
# ---------------------------------------------------------------------------

def test_lxc_cache_path_is_the_cache_base(run_download, container_args, env,
                                          tmp_path: Path) -> None:
    base = tmp_path / "elsewhere" / "my cache"
    env["LXC_CACHE_PATH"] = str(base)
    res = run_download(*container_args, *SINGLE)
    assert res.returncode == 0, show(res)
    assert (cache_of(base, "single", "one", "amd64") / "build_id").read_text().strip() == \
        "20261127_00:00"
    assert sorted(os.listdir(str(base))) == ["download"]
    assert not (Path(env["HOME"]) / ".cache").exists()


def test_root_without_lxc_cache_path_uses_var_cache_lxc(run_download, env,
                                                        private_server: ImageServer,
                                                        gpg_keys: GpgKeys,
                                                        tmp_path: Path) -> None:
    dist = "lxcdltest" + uuid.uuid4().hex[:10]  # no other test shares /var/cache/lxc/<dist>
    img = support.publish_image(private_server.docroot,
                                support.ImageSpec(dist, "r1", "amd64", "20261127_00:00"),
                                gpg_keys, tmp_path)
    publish_index(private_server, gpg_keys, [img.entry])
    env["DOWNLOAD_KEYSERVER"] = private_server.keyserver_url
    del env["LXC_CACHE_PATH"]
    download_dir = Path("/var/cache/lxc/download")
    created_download_dir = not download_dir.exists()
    c1 = another(tmp_path, "c1")
    try:
        res = run_download(*c1.args(private_server, gpg_keys), "-d", dist, "-r", "r1",
                           "-a", "amd64")
        assert res.returncode == 0, show(res)
        cache = cache_of(Path("/var/cache/lxc"), dist, "r1", "amd64")
        assert (cache / "build_id").read_text().strip() == "20261127_00:00"
        assert (cache / "rootfs.tar.xz").read_bytes() == img.rootfs_tar.read_bytes()
        assert not (Path(env["HOME"]) / ".cache").exists()
    finally:
        shutil.rmtree(str(download_dir / dist), ignore_errors=True)
        if created_download_dir:
            try:
                download_dir.rmdir()
            except OSError:
                pass


# --- unprivileged user namespace ---------------------------------------------

@pytest.fixture(scope="module")
def lxc_user() -> pwd.struct_passwd:
    """The unprivileged test user (tests/lxc_host_setup.sh makes it when missing)."""
    try:
        pwd.getpwnam(lxc_helpers.TEST_USER)
    except KeyError:
        setup = Path(__file__).resolve().parent / "lxc_host_setup.sh"
        subprocess.run(["bash", str(setup)], check=True, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT)
        lxc_helpers.host_supports_unprivileged.cache_clear()
    ok, why = lxc_helpers.host_supports_unprivileged()
    assert ok, why
    return pwd.getpwnam(lxc_helpers.TEST_USER)


def subid_start(user: str, path: str) -> int:
    with open(path) as f:
        for line in f:
            fields = line.strip().split(":")
            if fields[0] == user and int(fields[2]) >= 65536:
                return int(fields[1])
    raise AssertionError("no %s range for %s" % (path, user))


class UserNamespaceRun:
    """Everything the test user needs, in a 0755 directory outside pytest's 0700 tmp:
    a copy of the program, the CA, python-gnupg (one module file), a home, containers."""

    def __init__(self, user: pwd.struct_passwd, pki: support.Pki, server: ImageServer) -> None:
        import gnupg

        self.user = user
        self.server = server
        self.dir = Path(tempfile.mkdtemp(prefix="lxcdl-userns-", dir="/tmp"))
        self.dir.chmod(0o755)
        shutil.copy(str(support.SCRIPT), str(self.dir / "lxc_download.py"))
        shutil.copy(str(pki.ca_cert), str(self.dir / "ca.pem"))
        (self.dir / "pylib").mkdir()
        shutil.copy(gnupg.__file__, str(self.dir / "pylib" / "gnupg.py"))
        for p in self.dir.rglob("*"):
            p.chmod(0o755 if p.is_dir() else 0o644)
        self.home = self.dir / "home"
        self.home.mkdir(mode=0o755)
        os.chown(str(self.home), user.pw_uid, user.pw_gid)
        # lxc-create's mapping: the container's ids from /etc/subuid, plus the calling
        # user's own uid (here as 65536) so it can reach its home and the container dir
        self.uid0 = subid_start(user.pw_name, "/etc/subuid")
        self.gid0 = subid_start(user.pw_name, "/etc/subgid")
        self.mapped = 65536

    def container(self, name: str) -> Container:
        c = support.make_container(self.dir / "containers", name)
        for p in (self.dir / "containers", c.path, c.rootfs, c.config):
            os.chown(str(p), self.user.pw_uid, self.user.pw_gid)
        return c

    def run(self, args: List[str], mapped: bool = True) -> subprocess.CompletedProcess:
        env = {"HOME": str(self.home), "PATH": "/usr/bin:/bin:/usr/sbin:/sbin",
               "LANG": "C.UTF-8", "SSL_CERT_FILE": str(self.dir / "ca.pem"),
               "PYTHONPATH": str(self.dir / "pylib"),
               "DOWNLOAD_KEYSERVER": self.server.keyserver_url}
        usernsexec = ["lxc-usernsexec",
                      "-m", "u:0:%d:65536" % self.uid0, "-m", "g:0:%d:65536" % self.gid0,
                      "-m", "u:%d:%d:1" % (self.mapped, self.user.pw_uid),
                      "-m", "g:%d:%d:1" % (self.mapped, self.user.pw_gid), "--"]
        extra = ["--mapped-uid", str(self.mapped), "--mapped-gid", str(self.mapped)] \
            if mapped else []
        cmd = ["runuser", "-u", self.user.pw_name, "--", "env", "-i"]
        cmd += ["%s=%s" % kv for kv in env.items()]
        cmd += usernsexec + ["/usr/bin/python3", str(self.dir / "lxc_download.py")]
        cmd += list(args) + extra
        return subprocess.run(cmd, cwd=str(self.dir), stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              timeout=300)

    def close(self) -> None:
        shutil.rmtree(str(self.dir), ignore_errors=True)


@pytest.fixture
def userns(lxc_user: pwd.struct_passwd, pki: support.Pki,
           image_server: ImageServer) -> Iterator[UserNamespaceRun]:
    run = UserNamespaceRun(lxc_user, pki, image_server)
    yield run
    run.close()


def test_user_namespace_caches_in_home_with_user_index_and_files(
        userns: UserNamespaceRun, image_server: ImageServer, gpg_keys: GpgKeys) -> None:
    c1 = userns.container("c1")
    res = userns.run(c1.args(image_server, gpg_keys) + list(SINGLE))
    assert res.returncode == 0, show(res)
    cache = cache_of(userns.home / ".cache" / "lxc", "single", "one", "amd64")
    assert (cache / "build_id").read_text().strip() == "20261127_00:00"
    assert image_server.count("/meta/1.0/index-user.7") == 1
    assert image_server.count("/meta/1.0/index-system*") == 0
    # the relevant files are the -user ones: config-user (with userns.conf) and
    # excludes-user (no device nodes unpacked)
    config = c1.config.read_text()
    assert "lxc.include = /usr/share/lxc/config/userns.conf" in config, config
    assert not os.path.lexists(str(c1.rootfs / "dev/null"))
    assert not os.path.lexists(str(c1.rootfs / "dev/loop9"))
    assert (c1.rootfs / "etc/build").read_text() == "20261127_00:00\n"
    # the cache is handed to the user who asked for it (--mapped-uid/gid)
    # ... and so is ~/.cache if the run made it (the shell leaves it to the container's root)
    for p in (userns.home / ".cache", userns.home / ".cache" / "lxc", cache, cache / "build_id",
              cache / "rootfs.tar.xz"):
        st = os.stat(str(p))
        assert (st.st_uid, st.st_gid) == (userns.user.pw_uid, userns.user.pw_gid), p


def test_user_namespace_without_map_is_an_error(userns: UserNamespaceRun,
                                                image_server: ImageServer,
                                                gpg_keys: GpgKeys) -> None:
    c1 = userns.container("c1")
    res = userns.run(c1.args(image_server, gpg_keys) + list(SINGLE), mapped=False)
    assert res.returncode == 1, show(res)
    assert errors(res) == ["ERROR: In a user namespace without a map"], show(res)
    assert image_server.paths() == []
    assert not (userns.home / ".cache").exists()
    assert os.listdir(str(c1.rootfs)) == []


# ---------------------------------------------------------------------------
# concurrency and interruption
# ---------------------------------------------------------------------------

def test_four_concurrent_creates_download_once(env, image_server: ImageServer,
                                               gpg_keys: GpgKeys, catalog: Catalog,
                                               tmp_path: Path) -> None:
    containers = [another(tmp_path, "c%d" % i) for i in range(4)]
    procs = [start_download(c.args(image_server, gpg_keys) + list(TESTOS), env, tmp_path)
             for c in containers]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    for rc, out, err in results:
        assert rc == 0, "rc=%s\n%s\n%s" % (rc, out, err)
    assert image_server.count(image_rel(catalog) + "rootfs.tar.xz") == 1
    assert image_server.count(image_rel(catalog) + "meta.tar.xz") == 1
    assert sum("The image cache is now ready" in out.splitlines() for _, out, _ in results) == 1
    assert sum("Using image from local cache" in out.splitlines() for _, out, _ in results) == 3
    for c in containers:
        assert (c.rootfs / "etc/build").read_text() == NEW_BUILD + "\n"
        assert (c.rootfs / "etc/hostname").read_text() == c.name + "\n"
    assert partials(env_cache(env)) == []


def test_sigkill_during_first_download_leaves_no_cache(env, image_server: ImageServer,
                                                       gpg_keys: GpgKeys, catalog: Catalog,
                                                       tmp_path: Path) -> None:
    rootfs = image_rel(catalog, "single") + "rootfs.tar.xz"
    size = catalog.image("single").rootfs_tar.stat().st_size
    image_server.add_rule(rootfs, support.stall(60, after=size // 2), times=1)
    env["TMPDIR"] = str(tmp_path / "tmpdir")
    os.mkdir(env["TMPDIR"])
    cache = env_cache(env, "single", "one", "amd64")
    c1 = another(tmp_path, "c1")
    proc = start_download(c1.args(image_server, gpg_keys) + list(SINGLE) +
                          ["--timeout", "120"], env, tmp_path)
    wait_until_stalled(proc, image_server, rootfs)
    proc.kill()
    proc.communicate(timeout=30)
    assert not os.path.lexists(str(cache))
    # the next run succeeds and leaves no staging directory behind
    c2 = another(tmp_path, "c2")
    res = support.run_cmd([sys.executable, str(support.SCRIPT), *c2.args(image_server, gpg_keys),
                           *SINGLE], env, cwd=tmp_path)
    assert res.returncode == 0, show(res)
    assert (cache / "build_id").read_text().strip() == "20261127_00:00"
    assert (cache / "rootfs.tar.xz").read_bytes() == catalog.image("single").rootfs_tar.read_bytes()
    assert partials(cache) == []
    assert (c2.rootfs / "etc/build").read_text() == "20261127_00:00\n"


def test_sigkill_during_update_keeps_previous_cache(env, private_server: ImageServer,
                                                    gpg_keys: GpgKeys, catalog: Catalog,
                                                    tmp_path: Path) -> None:
    env["DOWNLOAD_KEYSERVER"] = private_server.keyserver_url
    env["TMPDIR"] = str(tmp_path / "tmpdir")
    os.mkdir(env["TMPDIR"])
    old = catalog.image("testos", build=OLD_BUILD)
    new = catalog.image("testos", build=NEW_BUILD)
    publish_index(private_server, gpg_keys, [old.entry])

    def create(name: str) -> subprocess.CompletedProcess:
        c = another(tmp_path, name)
        return support.run_cmd([sys.executable, str(support.SCRIPT),
                                *c.args(private_server, gpg_keys), *TESTOS], env, cwd=tmp_path)

    assert create("c1").returncode == 0
    cache = env_cache(env)
    publish_index(private_server, gpg_keys, [old.entry, new.entry])
    set_expiry(cache, time.time() - 60)
    before = support.tree_snapshot(cache)
    new_rootfs = new.entry.path + "rootfs.tar.xz"
    private_server.add_rule(new_rootfs, support.stall(60, after=new.rootfs_tar.stat().st_size // 2),
                            times=1)
    c2 = another(tmp_path, "c2")
    proc = start_download(c2.args(private_server, gpg_keys) + list(TESTOS) +
                          ["--timeout", "120"], env, tmp_path)
    wait_until_stalled(proc, private_server, new_rootfs)
    proc.kill()
    proc.communicate(timeout=30)
    assert_whole_or_absent(cache)
    assert support.diff_snapshots(before, support.tree_snapshot(cache)) == []
    assert (cache / "rootfs.tar.xz").read_bytes() == old.rootfs_tar.read_bytes()
    # the next run cleans up after the killed one and installs the new build
    res = create("c3")
    assert res.returncode == 0, show(res)
    assert (cache / "build_id").read_text().strip() == NEW_BUILD
    assert (cache / "rootfs.tar.xz").read_bytes() == new.rootfs_tar.read_bytes()
    assert partials(cache) == []


def test_sigterm_during_download_removes_temporary_files(env, image_server: ImageServer,
                                                         gpg_keys: GpgKeys,
                                                         catalog: Catalog,
                                                         tmp_path: Path) -> None:
    rootfs = image_rel(catalog, "single") + "rootfs.tar.xz"
    size = catalog.image("single").rootfs_tar.stat().st_size
    image_server.add_rule(rootfs, support.stall(60, after=size // 2), times=1)
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    env["TMPDIR"] = str(tmpdir)  # the program's lxc-download.* work directory goes here
    cache = env_cache(env, "single", "one", "amd64")
    homes_before = set(glob.glob(GPG_HOME_GLOB))
    c1 = another(tmp_path, "c1")
    proc = start_download(c1.args(image_server, gpg_keys) + list(SINGLE) +
                          ["--timeout", "120"], env, tmp_path)
    wait_until_stalled(proc, image_server, rootfs)
    assert [n for n in os.listdir(str(tmpdir)) if n.startswith("lxc-download.")], \
        "the work directory is not under TMPDIR: this test could not see it left behind"
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert time.monotonic() - started < 30, "SIGTERM was not acted on promptly"
    assert proc.returncode != 0, (out, err)
    assert [ln for ln in err.splitlines() if ln.startswith("ERROR:")], err
    assert "Traceback" not in err
    assert os.listdir(str(tmpdir)) == []
    assert partials(cache) == []
    assert not os.path.lexists(str(cache))
    assert os.listdir(str(c1.rootfs)) == []
    deadline = time.monotonic() + 10
    while processes_with_marker(env[MARKER]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_with_marker(env[MARKER]) == []
    left = set(glob.glob(GPG_HOME_GLOB)) - homes_before
    deadline = time.monotonic() + 15  # another session's live run may own a new one
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = set(glob.glob(GPG_HOME_GLOB)) - homes_before
    assert left == set()
    # and the next run succeeds
    res = support.run_cmd([sys.executable, str(support.SCRIPT),
                           *c1.args(image_server, gpg_keys), *SINGLE], env, cwd=tmp_path)
    assert res.returncode == 0, show(res)
    assert (cache / "build_id").read_text().strip() == "20261127_00:00"
