"""Helpers for the lxc_download.py integration tests that run real LXC.

The host is prepared by ``tests/lxc_host_setup.sh`` (run once as root).
Tests themselves run as root: privileged containers are handled directly,
unprivileged ones by switching to the test user (``LXC_TEST_USER``, default
``lxcuser``) with ``runuser``.

Things worth knowing (found on the Debian 12 / LXC 5.0.2 / cgroup-v1 host):

* There is no network bridge, so every container gets
  ``lxc.net.0.type = empty`` through the ``-f`` config file.
* ``lxc-create -f FILE`` *replaces* the default config
  (``~/.config/lxc/default.conf`` for a user), so for unprivileged
  containers the file includes that default config explicitly, otherwise the
  ``lxc.idmap`` lines are lost ("No uid mapping for container root").
* Unprivileged containers run without any cgroup (no hierarchy is writable
  by the user). That only works if the container config sets no cgroup
  limits, i.e. it includes ``/usr/share/lxc/config/userns.conf`` after
  ``common.conf`` (the download template's "config-user" does that).
* Everything the user's ``lxc-create`` reads (template script, image cache,
  config file) must be readable by the test user; pytest's ``tmp_path`` for
  root lives under the 0700 ``/tmp/pytest-of-root`` and is NOT.
"""

import functools
import os
import pwd
import shutil
import subprocess
import tempfile
from typing import List, Mapping, Optional, Sequence, Tuple

TEST_USER = os.environ.get("LXC_TEST_USER", "lxcuser")
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_SYSTEM_LXCPATH = "/var/lib/lxc"


def _user_home() -> str:
    return pwd.getpwnam(TEST_USER).pw_dir


def user_default_conf() -> str:
    """Path of the test user's LXC default config (holds the lxc.idmap lines)."""
    return os.path.join(_user_home(), ".config", "lxc", "default.conf")


def default_lxcpath(unprivileged: bool) -> str:
    """Where lxc-create puts containers when no ``-P`` is given."""
    if unprivileged:
        return os.path.join(_user_home(), ".local", "share", "lxc")
    return _SYSTEM_LXCPATH


def container_dir(name: str, unprivileged: bool, lxcpath: Optional[str] = None) -> str:
    """Directory holding ``config`` and ``rootfs`` of container ``name``."""
    return os.path.join(lxcpath or default_lxcpath(unprivileged), name)


def run_as_user(
    cmd: Sequence[str],
    env_extra: Optional[Mapping[str, str]] = None,
    timeout: float = 600,
) -> "subprocess.CompletedProcess[str]":
    """Run ``cmd`` as the test user with a clean login-like environment.

    ``env -i`` drops root's environment: a leaked ``XDG_RUNTIME_DIR`` or
    ``HOME`` would make LXC look for its lock/run directory and default
    config in root's places. Without ``XDG_RUNTIME_DIR`` LXC uses
    ``~/.cache/lxc/run``. The cwd is the user's home because the caller's
    cwd may not be accessible to the user. No cgroup placement is needed
    (see module docstring). stdin is /dev/null so nothing waits on a tty.
    """
    home = _user_home()
    env = {"HOME": home, "USER": TEST_USER, "LOGNAME": TEST_USER, "PATH": _PATH, "LANG": "C.UTF-8"}
    env.update(env_extra or {})
    argv = ["runuser", "-u", TEST_USER, "--", "env", "-i"]
    argv += ["%s=%s" % kv for kv in env.items()]
    argv += list(cmd)
    return subprocess.run(
        argv, cwd=home, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
    )


def _run(
    cmd: Sequence[str], unprivileged: bool, timeout: float
) -> "subprocess.CompletedProcess[str]":
    if unprivileged:
        return run_as_user(cmd, timeout=timeout)
    return subprocess.run(
        list(cmd), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
    )


def _lxcpath_args(lxcpath: Optional[str]) -> List[str]:
    return ["-P", lxcpath] if lxcpath else []


def lxc_create(
    name: str,
    template: str,
    template_args: Sequence[str] = (),
    unprivileged: bool = False,
    extra_config_lines: Sequence[str] = (),
    lxcpath: Optional[str] = None,
    timeout: float = 600,
) -> "subprocess.CompletedProcess[str]":
    """``lxc-create -n name -t template -f <conf> -- template_args``.

    The ``-f`` file always sets ``lxc.net.0.type = empty`` (no bridge on the
    host); for unprivileged containers it first includes the user's
    default.conf, because ``-f`` replaces it and the idmap would be lost.
    The file is world-readable so the test user can read it. ``template``
    must be an absolute path readable/executable by whoever runs lxc-create.
    """
    lines: List[str] = []
    if unprivileged:
        lines.append("lxc.include = %s" % user_default_conf())
    lines.append("lxc.net.0.type = empty")
    lines.extend(extra_config_lines)
    fd, conf = tempfile.mkstemp(prefix="lxc-test-", suffix=".conf", dir="/tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.chmod(conf, 0o644)
        cmd = ["lxc-create", "-n", name, "-t", template, "-f", conf]
        cmd += _lxcpath_args(lxcpath)
        cmd += ["--"] + list(template_args)
        return _run(cmd, unprivileged, timeout)
    finally:
        os.unlink(conf)


def lxc_execute(
    name: str,
    cmd: Sequence[str],
    unprivileged: bool = False,
    lxcpath: Optional[str] = None,
    timeout: float = 120,
) -> "subprocess.CompletedProcess[str]":
    """``lxc-execute -n name -- cmd`` (runs cmd under LXC's init.lxc.static).

    stdout of the command is captured; LXC's own errors go to stderr.
    """
    argv = ["lxc-execute", "-n", name] + _lxcpath_args(lxcpath) + ["--"] + list(cmd)
    return _run(argv, unprivileged, timeout)


def lxc_destroy(
    name: str,
    unprivileged: bool = False,
    lxcpath: Optional[str] = None,
    timeout: float = 120,
) -> "subprocess.CompletedProcess[str]":
    """Destroy container ``name`` (stopping it first), tolerating absence.

    A failed lxc-create can leave a half-made directory that lxc-destroy
    refuses ("Container is not defined"); we run as root, so remove it
    directly (it may contain files owned by subordinate ids).
    """
    cmd = ["lxc-destroy", "-f", "-n", name] + _lxcpath_args(lxcpath)
    result = _run(cmd, unprivileged, timeout)
    leftover = container_dir(name, unprivileged, lxcpath)
    if os.path.lexists(leftover):
        shutil.rmtree(leftover, ignore_errors=True)
    return result


@functools.lru_cache(maxsize=None)
def host_supports_unprivileged() -> Tuple[bool, str]:
    """Return ``(True, "")`` or ``(False, reason)`` for unprivileged tests.

    Checks the prerequisites set up by tests/lxc_host_setup.sh and then
    probes for real that the user can build a user namespace with its
    subordinate ids (``lxc-usernsexec``), so a skip always says why.
    """
    if os.geteuid() != 0:
        return False, "tests must run as root to switch to the test user %r" % TEST_USER
    for tool in ("runuser", "lxc-create", "lxc-execute", "lxc-usernsexec", "newuidmap", "newgidmap"):
        if shutil.which(tool, path=_PATH) is None:
            return False, "%s not installed" % tool
    try:
        _user_home()
    except KeyError:
        return False, "test user %r missing; run tests/lxc_host_setup.sh as root" % TEST_USER
    if not os.path.isfile(user_default_conf()):
        return False, "%s missing; run tests/lxc_host_setup.sh as root" % user_default_conf()
    for path in ("/etc/subuid", "/etc/subgid"):
        try:
            with open(path) as f:
                if not any(line.split(":")[0] == TEST_USER for line in f):
                    return False, "no %s entry for %r" % (path, TEST_USER)
        except OSError as e:
            return False, "cannot read %s: %s" % (path, e)
    try:
        with open("/proc/sys/user/max_user_namespaces") as f:
            if int(f.read()) == 0:
                return False, "user namespaces disabled (user.max_user_namespaces = 0)"
    except OSError:
        return False, "kernel without user namespace support"
    try:
        probe = run_as_user(["lxc-usernsexec", "--", "true"], timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        return False, "user namespace probe failed: %s" % e
    if probe.returncode != 0:
        return False, "user %r cannot enter a user namespace: %s" % (
            TEST_USER,
            (probe.stderr or probe.stdout).strip()[-500:],
        )
    return True, ""
