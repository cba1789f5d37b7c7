"""The container's configuration after a create (SPEC §10.2–§10.7, and §5 `relevant_file`).

- The config, fstab and templated hostname equal, byte for byte, what the Debian shell
  template writes for the same image and the same starting config; and the config has
  §10.2's sections, order and words.
- LXC_NAME/LXC_PATH/LXC_ROOTFS/LXC_TEMPLATE_CONFIG/LXC_HOOK_DIR are replaced in the
  config, the fstab and the rootfs files named by `templates` (missing ones skipped);
  the LXC_TEMPLATE_CONFIG/LXC_HOOK_DIR environment overrides are honoured.
- etc/init/tty.conf gets `mingetty --nohangup`; the create-message closes stdout after a
  blank line and `---`.
- relevant_file picks config-<mode> over config, then its `.7`; no relevant config is an
  error; a meta tarball with unexpected members is refused.
- --mapped-uid/--mapped-gid chown <path>/config and <path>/fstab.
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
BUILD = "20270101_00:00"
ALL_PLACEHOLDERS = "LXC_NAME LXC_PATH LXC_ROOTFS LXC_TEMPLATE_CONFIG LXC_HOOK_DIR"
META_CONFIG = support.META_CONFIG  # "lxc.include = LXC_TEMPLATE_CONFIG/common.conf\nlxc.arch = x86_64\n"

# What lxc-create writes before calling the template (its header comments mention
# "lxc-download", which the template's /lxc./ pattern treats as container config).
STARTING_CONFIG = (
    "# Template used to create this container: /usr/share/lxc/templates/lxc-download\n"
    "# Parameters passed to the template: -d single -r one -a amd64\n"
    "# a plain comment\n"
    "lxc.net.0.type = empty\n"
    "lxc.net.0.flags = up\n"
    "lxc.rootfs.path = dir:{rootfs}\n"
    "\n"
    "lxc.apparmor.profile = generated\n"
    "lxc.net.0.hwaddr = 00:16:3e:12:34:56\n"
)


def _ok(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 0, "rc=%d\nstdout:\n%s\nstderr:\n%s" % (
        res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr


def _fresh(c: Container, config: str = STARTING_CONFIG) -> None:
    """(Re)make the container directory as lxc-create leaves it."""
    if c.path.exists():
        shutil.rmtree(str(c.path))
    c.rootfs.mkdir(parents=True)
    c.config.write_text(config.format(rootfs=c.rootfs))


def _error_lines(res: subprocess.CompletedProcess) -> List[str]:
    return [ln for ln in res.stderr.splitlines() if ln.startswith("ERROR: ")]


# ---------------------------------------------------------------------------
# Same config as the shell template
# ---------------------------------------------------------------------------

def test_config_fstab_and_output_equal_the_shell_templates(
        run_download, run_shell_template, image_server: ImageServer, gpg_keys: GpgKeys,
        tmp_path: Path) -> None:
    c = Container("c1", tmp_path / "ct" / "c1", tmp_path / "ct" / "c1" / "rootfs")
    _fresh(c)
    shell_res = run_shell_template(*c.shell_args(image_server), *SINGLE)
    _ok(shell_res)
    shell_config = c.config.read_text()
    shell_fstab = (c.path / "fstab").read_text()
    shell_hostname = (c.rootfs / "etc/hostname").read_text()
    assert sorted(os.listdir(str(c.path))) == ["config", "fstab", "rootfs"]

    _fresh(c)
    res = run_download(*c.args(image_server, gpg_keys), *SINGLE)
    _ok(res)
    assert sorted(os.listdir(str(c.path))) == ["config", "fstab", "rootfs"]
    config = c.config.read_text()
    assert config == shell_config
    assert (c.path / "fstab").read_text() == shell_fstab
    assert (c.rootfs / "etc/hostname").read_text() == shell_hostname == "c1\n"

    # §10.2, spelled out: kept lines, then the three sections in order.
    assert config == (
        "# Parameters passed to the template: -d single -r one -a amd64\n"
        "# a plain comment\n"
        "\n"
        "\n"
        "# Distribution configuration\n"
        "lxc.include = /usr/share/lxc/config/common.conf\n"
        "lxc.arch = x86_64\n"
        "\n"
        "# Container specific configuration\n"
        "# Template used to create this container: /usr/share/lxc/templates/lxc-download\n"
        "lxc.rootfs.path = dir:%s\n"
        "lxc.apparmor.profile = generated\n"
        "lxc.mount.fstab = %s/fstab\n"
        "lxc.uts.name = c1\n"
        "\n"
        "# Network configuration\n"
        "lxc.net.0.type = empty\n"
        "lxc.net.0.flags = up\n"
        "lxc.net.0.hwaddr = 00:16:3e:12:34:56\n" % (c.rootfs, c.path))
    # §10.3/10.4: the fstab is the meta's, placeholders replaced.
    assert (c.path / "fstab").read_text() == "# c1 fstab (%s)\n" % c.rootfs

    # §10.7: the create-message ends stdout, after a blank line and `---`, as in the shell.
    tail = "Unpacking the rootfs\n\n---\n" + support.CREATE_MESSAGE
    assert res.stdout.endswith(tail)
    assert shell_res.stdout.endswith(tail)
    assert res.stdout[res.stdout.index("Unpacking the rootfs"):] == \
        shell_res.stdout[shell_res.stdout.index("Unpacking the rootfs"):]


def test_mapped_uid_and_gid_own_config_and_fstab(
        run_download, image_server: ImageServer, gpg_keys: GpgKeys,
        container: Container) -> None:
    res = run_download(*container.args(image_server, gpg_keys), *SINGLE,
                       "--mapped-uid", "1234", "--mapped-gid", "2345")
    _ok(res)
    for name in ("config", "fstab"):
        st = os.stat(str(container.path / name))
        assert (st.st_uid, st.st_gid) == (1234, 2345), name
    assert "lxc.uts.name = c1\n" in container.config.read_text()
    # the image's own owners are kept as they are (system mode: no shifting)
    st = os.lstat(str(container.rootfs / "home/user/file.txt"))
    assert (st.st_uid, st.st_gid) == (1000, 1000)
    assert os.lstat(str(container.rootfs / "etc/hostname")).st_uid == 0


# ---------------------------------------------------------------------------
# A server with images whose meta differs
# ---------------------------------------------------------------------------

Member = Tuple[tarfile.TarInfo, Optional[bytes]]

TEMPLATED = "name=LXC_NAME path=LXC_PATH rootfs=LXC_ROOTFS conf=LXC_TEMPLATE_CONFIG hooks=LXC_HOOK_DIR\n"

# release -> meta overrides, for images sharing the catalog's single/one rootfs
META_VARIANTS: Dict[str, Dict[str, Optional[str]]] = {
    "compat7": {"config.7": "# from config.7\n" + META_CONFIG},
    "system": {"config-system": "# from config-system\n" + META_CONFIG},
    "system7": {"config-system": "# from config-system\n" + META_CONFIG,
                "config-system.7": "# from config-system.7\n" + META_CONFIG},
    # config-system exists, so config.7 is not looked at (config-system.7 would be)
    "system-not-config7": {"config-system": "# from config-system\n" + META_CONFIG,
                           "config.7": "# from config.7\n" + META_CONFIG,
                           "fstab.7": "# fstab.7 for LXC_NAME\n"},
    "noconfig": {"config": None},
    "bare": {"fstab": None, "create-message": None, "templates": None},
}


def _member(name: str, data: Optional[bytes] = None, kind: bytes = tarfile.REGTYPE,
            link: str = "") -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mtime = kind, link, support.FIXED_MTIME
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    if data is not None:
        info.size = len(data)
    return info, data


def _bad_metas(host: str) -> Dict[str, Tuple[List[Member], str]]:
    """release -> (meta.tar.xz members, the unexpected member's name)."""
    good = [_member("./", kind=tarfile.DIRTYPE), _member("./config", META_CONFIG.encode()),
            _member("./expiry", b"%d\n" % (support.FIXED_MTIME + 10 ** 9))]
    return {
        "meta-symlink": (good + [_member("./fstab", kind=tarfile.SYMTYPE, link=host + "/hostfile")],
                         "./fstab"),
        "meta-dotdot": (good + [_member("../x", b"evil\n")], "../x"),
        "meta-abs": (good + [_member(host + "/evil-abs", b"evil\n")], host + "/evil-abs"),
        "meta-hardlink": (good + [_member("./templates", kind=tarfile.LNKTYPE,
                                          link=host + "/hostfile")], "./templates"),
    }


@pytest.fixture(scope="module")
def host_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="lxd-cfg-", dir="/tmp"))
    (d / "hostfile").write_text("host file\n")
    yield d
    shutil.rmtree(str(d), ignore_errors=True)




@pytest.fixture(scope="module")
def cfg_server(tmp_path_factory: pytest.TempPathFactory, pki: Pki, gpg_keys: GpgKeys,
               catalog: Catalog, host_dir: Path) -> Iterator[ImageServer]:
    """Signed server (index-system.7) with `cfg/<release>/amd64` images: the meta
    variants above and bad metas (all on the single/one rootfs), and `cfg/tmpl/amd64`,
    an image with a templated etc/motd and an etc/init/tty.conf."""
    root = tmp_path_factory.mktemp("cfgserver")
    docroot, work = root / "docroot", root / "work"
    work.mkdir()
    rootfs = catalog.image("single", "one", "amd64")
    entries = []

    def place(release: str) -> Path:
        out = docroot / "images/cfg" / release / "amd64/default" / BUILD
        out.mkdir(parents=True)
        for name in ("rootfs.tar.xz", "rootfs.tar.xz.asc"):
            os.link(str(rootfs.dir / name), str(out / name))
        entries.append(support.IndexEntry("cfg", release, "amd64", "default", BUILD,
                                          "/images/cfg/%s/amd64/default/%s/" % (release, BUILD)))
        return out

    for release, meta in META_VARIANTS.items():
        out = place(release)
        support.build_meta(out / "meta.tar.xz", work / release, meta=meta)
        gpg_keys.sign(out / "meta.tar.xz")
    for release, (members, _) in _bad_metas(str(host_dir)).items():
        out = place(release)
        support.write_tar_xz(out / "meta.tar.xz", members)
        gpg_keys.sign(out / "meta.tar.xz")

    spec = support.ImageSpec("cfg", "tmpl", "amd64", BUILD, tty_conf=True, extra_files={
        "etc/motd": TEMPLATED, "etc/not-listed": TEMPLATED}, meta={
        "config": META_CONFIG + "# " + TEMPLATED,
        "fstab": "# fstab " + TEMPLATED,
        "templates": "/etc/hostname\n/etc/motd\n/etc/missing\n/nodir/missing\n"})
    entries.append(support.publish_image(docroot, spec, gpg_keys, work).entry)
    support.write_index(docroot, "system", entries, True, gpg_keys)
    server = ImageServer(docroot, pki)
    yield server
    server.close()


def _create(run_download, c: Container, server: ImageServer, keys: GpgKeys, release: str,
            env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    return run_download(*c.args(server, keys), "-d", "cfg", "-r", release, "-a", "amd64", env=env)


def _distribution_section(config: str) -> str:
    start = config.index("# Distribution configuration\n") + len("# Distribution configuration\n")
    return config[start:config.index("\n# Container specific configuration\n")]


def test_placeholders_replaced_in_config_fstab_and_template_files_with_env_overrides(
        run_download, cfg_server: ImageServer, gpg_keys: GpgKeys, container: Container,
        env: Dict[str, str]) -> None:
    c = container
    res = _create(run_download, c, cfg_server, gpg_keys, "tmpl",
                  env=dict(env, LXC_TEMPLATE_CONFIG="/opt/tc", LXC_HOOK_DIR="/opt/hooks"))
    _ok(res)
    done = "name=c1 path=%s rootfs=%s conf=/opt/tc hooks=/opt/hooks\n" % (c.path, c.rootfs)
    config = c.config.read_text()
    assert _distribution_section(config) == (
        "lxc.include = /opt/tc/common.conf\nlxc.arch = x86_64\n# " + done)
    assert (c.path / "fstab").read_text() == "# fstab " + done
    assert "lxc.mount.fstab = %s/fstab\n" % c.path in config
    assert (c.rootfs / "etc/motd").read_text() == done
    assert (c.rootfs / "etc/hostname").read_text() == "c1\n"
    # not listed in templates: untouched; listed but missing: skipped, not created
    assert (c.rootfs / "etc/not-listed").read_text() == TEMPLATED
    assert not os.path.lexists(str(c.rootfs / "etc/missing"))
    assert not os.path.lexists(str(c.rootfs / "nodir"))
    # §10.5
    assert (c.rootfs / "etc/init/tty.conf").read_text() == "exec /sbin/mingetty --nohangup tty1\n"
    assert "LXC_" not in config


def test_default_template_config_and_hook_dir_without_env(
        run_download, cfg_server: ImageServer, gpg_keys: GpgKeys, container: Container,
        env: Dict[str, str]) -> None:
    clean = {k: v for k, v in env.items() if k not in ("LXC_TEMPLATE_CONFIG", "LXC_HOOK_DIR")}
    _ok(_create(run_download, container, cfg_server, gpg_keys, "tmpl", env=clean))
    assert (container.rootfs / "etc/motd").read_text() == (
        "name=c1 path=%s rootfs=%s conf=/usr/share/lxc/config hooks=/usr/share/lxc/hooks\n"
        % (container.path, container.rootfs))


@pytest.mark.parametrize("release, first_line", [
    ("compat7", "# from config.7"),
    ("system", "# from config-system"),
    ("system7", "# from config-system.7"),
    ("system-not-config7", "# from config-system"),
])
def test_relevant_config_file_in_system_mode(
        release: str, first_line: str, run_download, cfg_server: ImageServer,
        gpg_keys: GpgKeys, container: Container) -> None:
    res = _create(run_download, container, cfg_server, gpg_keys, release)
    _ok(res)
    assert _distribution_section(container.config.read_text()) == (
        first_line + "\nlxc.include = /usr/share/lxc/config/common.conf\nlxc.arch = x86_64\n")
    fstab = (container.path / "fstab").read_text()
    if release == "system-not-config7":  # fstab -> fstab.7 (no fstab-system)
        assert fstab == "# fstab.7 for c1\n"
    else:
        assert fstab == "# c1 fstab (%s)\n" % container.rootfs


def test_meta_without_relevant_config_is_an_error(
        run_download, cfg_server: ImageServer, gpg_keys: GpgKeys, container: Container) -> None:
    res = _create(run_download, container, cfg_server, gpg_keys, "noconfig")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    assert _error_lines(res) == ["ERROR: meta tarball is missing the configuration file"]


def test_no_fstab_no_message_no_network_sections(
        run_download, cfg_server: ImageServer, gpg_keys: GpgKeys, tmp_path: Path) -> None:
    c = support.make_container(tmp_path / "ct", "bare1")
    c.config.write_text("lxc.rootfs.path = dir:%s\n" % c.rootfs)
    res = _create(run_download, c, cfg_server, gpg_keys, "bare")
    _ok(res)
    assert c.config.read_text() == (
        "\n"
        "# Distribution configuration\n"
        "lxc.include = /usr/share/lxc/config/common.conf\n"
        "lxc.arch = x86_64\n"
        "\n"
        "# Container specific configuration\n"
        "lxc.rootfs.path = dir:%s\n"
        "lxc.uts.name = bare1\n" % c.rootfs)
    assert not (c.path / "fstab").exists()
    assert res.stdout.endswith("Unpacking the rootfs\n")
    assert "---" not in res.stdout
    # no templates file: etc/hostname keeps its placeholder
    assert (c.rootfs / "etc/hostname").read_text() == "LXC_NAME\n"


@pytest.mark.parametrize("release", sorted(_bad_metas("/h")))
def test_meta_tarball_with_unexpected_member_is_refused(
        release: str, run_download, cfg_server: ImageServer, gpg_keys: GpgKeys,
        container: Container, env: Dict[str, str], host_dir: Path) -> None:
    member = _bad_metas(str(host_dir))[release][1]
    config_before = container.config.read_text()
    res = _create(run_download, container, cfg_server, gpg_keys, release)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    errors = _error_lines(res)
    assert len(errors) == 1 and member in errors[0], res.stderr
    # nothing cached, nothing unpacked or configured, nothing written outside
    cache_parent = Path(env["LXC_CACHE_PATH"]) / "download/cfg" / release / "amd64"
    assert not (cache_parent / "default").exists()
    assert [p.name for p in cache_parent.iterdir() if not p.name.endswith(".lock")] == []
    assert not os.path.lexists(str(cache_parent.parent / "x"))
    assert os.listdir(str(container.rootfs)) == []
    assert container.config.read_text() == config_before
    assert sorted(os.listdir(str(host_dir))) == ["hostfile"]
    assert (host_dir / "hostfile").read_text() == "host file\n"
    assert os.stat(str(host_dir / "hostfile")).st_nlink == 1
