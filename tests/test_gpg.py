"""GPG validation through the real program (SPEC §8, issue 2's GPG list).

Every test runs lxc_download.py as a subprocess against the loopback HTTPS image server
and its HKP keyserver (/pks/lookup), with the real gpg and python-gnupg: where the key
comes from (--keyserver, DOWNLOAD_KEYSERVER, --pubkey, the built-in copy), what counts
as a valid signature (index, rootfs and meta; subkeys of the expected primary key), what
happens without gpg or python-gnupg, and that the user's keyring and the gpg daemons are
left alone.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

import support
from support import Catalog, Container, GpgKeys, ImageServer

REPO = Path(__file__).resolve().parents[1]
# shared/ lies beside the checkout (CI's layout), or at the workplace's usual place
BUILTIN_KEY_FILE = next((p for p in (REPO.parent / "shared/keys/lxc-images.asc",
                                     Path("/work/shared/keys/lxc-images.asc")) if p.exists()),
                        REPO.parent / "shared/keys/lxc-images.asc")
LXC_IMAGES_FPR = "E7FB0CAEC8173D669066514CBAEFF88C22F6E216"
TESTOS = ("-d", "testos", "-r", "stable", "-a", "amd64")
GPG_HOME_GLOB = "/tmp/lxc-gpg.*"
MARKER = support.RUN_MARKER
pytestmark = pytest.mark.usefixtures("reap_our_gpg_daemons")
processes_with_marker = support.processes_with_marker


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def lines(text: str, prefix: str) -> List[str]:
    return [ln for ln in text.splitlines() if ln.startswith(prefix)]


def errors(res: subprocess.CompletedProcess) -> List[str]:
    return lines(res.stderr, "ERROR:")


def warnings(res: subprocess.CompletedProcess) -> List[str]:
    return lines(res.stderr, "WARNING:")


def show(res: subprocess.CompletedProcess) -> str:
    return "rc=%s\n--- stdout\n%s\n--- stderr\n%s" % (res.returncode, res.stdout, res.stderr)


def cache_dir(env: Dict[str, str], dist: str = "testos", release: str = "stable",
              arch: str = "amd64", variant: str = "default") -> Path:
    return Path(env["LXC_CACHE_PATH"]) / "download" / dist / release / arch / variant


def assert_nothing_unpacked_or_cached(container: Container, env: Dict[str, str]) -> None:
    """The rootfs is still empty, and no cache (not even a partial one) exists."""
    assert os.listdir(str(container.rootfs)) == []
    cache = cache_dir(env)
    assert not os.path.lexists(str(cache)), "a cache was left at %s" % cache
    if cache.parent.is_dir():
        leftovers = [n for n in os.listdir(str(cache.parent))
                     if n.startswith("." + cache.name) and not n.endswith(".lock")]
        assert leftovers == []


def lookups(server: ImageServer) -> List[support.Request]:
    return [r for r in server.requests if r.path == "/pks/lookup"]


def path_with_only(bin_dir: Path, *tools: str) -> str:
    """A PATH holding python3 and just these tools: a host that lacks the others."""
    bin_dir.mkdir()
    for tool in tools:
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    (bin_dir / "python3").symlink_to(sys.executable)
    return str(bin_dir)


def use_private(env: Dict[str, str], server: ImageServer) -> None:
    env["DOWNLOAD_KEYSERVER"] = server.keyserver_url


def pgrep(name: str) -> Set[str]:
    out = subprocess.run(["pgrep", "-a", name], stdout=subprocess.PIPE, text=True).stdout
    return {ln for ln in out.splitlines() if ln.strip()}


def daemons() -> Set[str]:
    """gpg-agent and dirmngr processes working for a lxc_download.py temporary home."""
    return {ln for ln in pgrep("gpg-agent") | pgrep("dirmngr") if "lxc-gpg." in ln}





def settle(leftovers, probe, seconds: float = 30.0):
    """Things another test session running at the same time owns go away when it ends;
    a real leak stays. Return what is still there after `seconds`."""
    deadline = time.monotonic() + seconds
    while leftovers and time.monotonic() < deadline:
        time.sleep(0.5)
        leftovers = probe(leftovers)
    return leftovers


# ---------------------------------------------------------------------------
# where the key comes from
# ---------------------------------------------------------------------------

def test_key_fetched_from_keyserver_option(run_download, container_args, env,
                                           image_server: ImageServer,
                                           gpg_keys: GpgKeys) -> None:
    env["DOWNLOAD_KEYSERVER"] = "hkp://127.0.0.1:9"  # nothing listens: must not be used
    res = run_download(*container_args, *TESTOS, "--keyserver", image_server.keyserver_url)
    assert res.returncode == 0, show(res)
    found = lookups(image_server)
    assert found, image_server.paths()
    assert any(gpg_keys.test_fpr in r.query.upper() for r in found), [r.query for r in found]
    assert "The image cache is now ready" in res.stdout.splitlines()


def test_key_fetched_from_download_keyserver_env(run_download, container_args, env,
                                                 image_server: ImageServer,
                                                 gpg_keys: GpgKeys) -> None:
    assert env["DOWNLOAD_KEYSERVER"] == image_server.keyserver_url
    res = run_download(*container_args, *TESTOS, "--list")
    assert res.returncode == 0, show(res)
    found = lookups(image_server)
    assert any(gpg_keys.test_fpr in r.query.upper() for r in found), image_server.paths()


def test_pubkey_file_needs_no_keyserver(run_download, container_args,
                                        image_server: ImageServer, gpg_keys: GpgKeys,
                                        container: Container) -> None:
    image_server.keyserver_status = 503
    res = run_download(*container_args, *TESTOS, "--pubkey", str(gpg_keys.test_pubkey))
    assert res.returncode == 0, show(res)
    assert lookups(image_server) == []
    assert (container.rootfs / "etc/build").read_text() == "20261127_05:24\n"
    assert warnings(res) == []


def test_builtin_key_matches_shared_key_file_byte_for_byte() -> None:
    sys.path.insert(0, str(REPO))
    try:
        import lxc_download
    finally:
        sys.path.remove(str(REPO))
    assert lxc_download.BUILTIN_KEY.encode("ascii") == BUILTIN_KEY_FILE.read_bytes()
    # the block is in the file itself, as text (it must work copied alone onto a host)
    assert BUILTIN_KEY_FILE.read_text() in (REPO / "lxc_download.py").read_text()


def test_builtin_key_is_the_lxc_image_signing_key(gnupghome: Path) -> None:
    sys.path.insert(0, str(REPO))
    try:
        import lxc_download
    finally:
        sys.path.remove(str(REPO))
    shown = subprocess.run(["gpg", "--homedir", str(gnupghome), "--batch", "--with-colons", "--show-keys"],
                           input=lxc_download.BUILTIN_KEY, capture_output=True, text=True, check=True).stdout
    fprs = [line.split(":")[9] for line in shown.splitlines() if line.startswith("fpr:")]
    assert fprs[0] == LXC_IMAGES_FPR
    assert lxc_download.DEFAULT_KEYID == "0x" + LXC_IMAGES_FPR


def test_keyserver_down_default_key_falls_back_to_builtin_key(
        run_download, container: Container, image_server: ImageServer) -> None:
    image_server.keyserver_status = 503
    # no --keyid: the default (real LXC) key. The test images are not signed by it.
    res = run_download(*container.shell_args(image_server), *TESTOS, timeout=120)
    assert res.returncode == 1, show(res)
    warn = warnings(res)
    assert len(warn) == 1 and "built-in" in warn[0], show(res)
    assert lookups(image_server), "the keyserver was not asked first"
    err = errors(res)
    assert len(err) == 1 and err[0].startswith("ERROR: Invalid signature for "), show(res)
    assert "index-system" in err[0]
    assert "Traceback" not in res.stderr
    assert os.listdir(str(container.rootfs)) == []


def test_keyserver_down_other_key_is_an_error(run_download, container_args,
                                              image_server: ImageServer,
                                              container: Container) -> None:
    image_server.keyserver_status = 503
    res = run_download(*container_args, *TESTOS, timeout=120)
    assert res.returncode == 1, show(res)
    assert errors(res) == ["ERROR: Unable to fetch GPG key from keyserver"], show(res)
    assert warnings(res) == []
    assert image_server.count("*/rootfs.tar.xz") == 0
    assert os.listdir(str(container.rootfs)) == []


def test_keyring_set_up_once_per_run(run_download, container_args,
                                     image_server: ImageServer) -> None:
    res = run_download(*container_args, *TESTOS)
    assert res.returncode == 0, show(res)
    assert res.stdout.splitlines().count("Setting up the GPG keyring") == 1, res.stdout
    # index, rootfs and meta were each verified against their .asc
    for name in ("index-system.7.asc", "rootfs.tar.xz.asc", "meta.tar.xz.asc"):
        assert image_server.count("*/" + name) == 1, image_server.paths()


# ---------------------------------------------------------------------------
# what counts as a valid signature
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["index", "rootfs", "meta"])
def test_file_signed_by_foreign_key_is_refused(target: str, run_download, env,
                                               private_server: ImageServer,
                                               catalog: Catalog, gpg_keys: GpgKeys,
                                               container: Container) -> None:
    use_private(env, private_server)
    img = catalog.image("testos", "stable", "amd64")
    rel = {"index": "meta/1.0/index-system.7",
           "rootfs": img.entry.path.lstrip("/") + "rootfs.tar.xz",
           "meta": img.entry.path.lstrip("/") + "meta.tar.xz"}[target]
    gpg_keys.sign(private_server.docroot / rel, "foreign")
    res = run_download(*container.args(private_server, gpg_keys), *TESTOS)
    assert res.returncode == 1, show(res)
    err = errors(res)
    assert len(err) == 1 and err[0].startswith("ERROR: Invalid signature for "), show(res)
    assert err[0].endswith(Path(rel).name), err[0]
    assert "Unpacking the rootfs" not in res.stdout
    assert_nothing_unpacked_or_cached(container, env)


def test_tampered_rootfs_with_original_signature_is_refused(run_download, env,
                                                            private_server: ImageServer,
                                                            catalog: Catalog,
                                                            gpg_keys: GpgKeys,
                                                            container: Container) -> None:
    use_private(env, private_server)
    rootfs = private_server.docroot / catalog.image("testos", "stable", "amd64").entry.path.lstrip("/") \
        / "rootfs.tar.xz"
    data = bytearray(rootfs.read_bytes())
    data[len(data) // 2] ^= 0xFF
    rootfs.write_bytes(bytes(data))
    res = run_download(*container.args(private_server, gpg_keys), *TESTOS)
    assert res.returncode == 1, show(res)
    err = errors(res)
    assert len(err) == 1 and err[0].startswith("ERROR: Invalid signature for "), show(res)
    assert err[0].endswith("rootfs.tar.xz"), err[0]
    assert_nothing_unpacked_or_cached(container, env)


def test_missing_rootfs_signature_is_an_error(run_download, env,
                                              private_server: ImageServer,
                                              catalog: Catalog, gpg_keys: GpgKeys,
                                              container: Container) -> None:
    use_private(env, private_server)
    img_dir = private_server.docroot / catalog.image("testos", "stable", "amd64").entry.path.lstrip("/")
    (img_dir / "rootfs.tar.xz.asc").unlink()
    res = run_download(*container.args(private_server, gpg_keys), *TESTOS)
    assert res.returncode == 1, show(res)
    err = errors(res)
    assert len(err) == 1 and "rootfs.tar.xz" in err[0], show(res)
    assert "Traceback" not in res.stderr
    assert_nothing_unpacked_or_cached(container, env)


def test_subkey_signatures_by_expected_primary_key_are_accepted(
        run_download, container: Container, image_server: ImageServer,
        gpg_keys: GpgKeys, catalog: Catalog) -> None:
    # the catalog is signed by the test key's signing subkey, never by the primary
    assert gpg_keys.test_subkey_fpr != gpg_keys.test_fpr
    res = run_download(*container.shell_args(image_server), "--keyid", gpg_keys.test_fpr,
                       *TESTOS, "--verbose")
    assert res.returncode == 0, show(res)
    assert errors(res) == [] and warnings(res) == []
    assert (container.rootfs / "etc/build").read_text() == "20261127_05:24\n"
    assert (container.rootfs / "etc/hostname").read_text() == "c1\n"


def test_pubkey_bundle_only_trusts_the_keyid_signer(run_download, env,
                                                   private_server: ImageServer,
                                                   catalog: Catalog, gpg_keys: GpgKeys,
                                                   container: Container,
                                                   tmp_path: Path) -> None:
    """A keyring holding another key too: a good signature by that other key is still
    refused, because only --keyid's key (or its subkeys) counts."""
    use_private(env, private_server)
    bundle = tmp_path / "bundle.asc"
    bundle.write_text(gpg_keys.armored("test") + gpg_keys.armored("foreign"))
    img = catalog.image("testos", "stable", "amd64")
    gpg_keys.sign(private_server.docroot / img.entry.path.lstrip("/") / "rootfs.tar.xz",
                  "foreign")
    res = run_download(*container.args(private_server, gpg_keys), *TESTOS,
                       "--pubkey", str(bundle))
    assert res.returncode == 1, show(res)
    err = errors(res)
    assert len(err) == 1 and err[0].startswith("ERROR: Invalid signature for "), show(res)
    assert err[0].endswith("rootfs.tar.xz"), err[0]
    assert lookups(private_server) == []
    assert_nothing_unpacked_or_cached(container, env)


def test_keyserver_answer_with_extra_keys_keeps_only_the_asked_key(run_download, env,
                                                                    private_server: ImageServer,
                                                                    catalog: Catalog, gpg_keys: GpgKeys,
                                                                    container: Container) -> None:
    """A keyserver that answers with another key too: only the asked-for key counts, so a
    file the other key signed is refused."""
    use_private(env, private_server)
    private_server.add_key(gpg_keys.armored("foreign") + gpg_keys.armored("test"), [gpg_keys.test_fpr])
    img = catalog.image("testos", "stable", "amd64")
    gpg_keys.sign(private_server.docroot / img.entry.path.lstrip("/") / "rootfs.tar.xz", "foreign")
    res = run_download(*container.args(private_server, gpg_keys), *TESTOS)
    assert res.returncode == 1, show(res)
    assert lookups(private_server), "the keyserver was not asked"
    err = errors(res)
    assert len(err) == 1 and err[0].startswith("ERROR: Invalid signature for "), show(res)
    assert err[0].endswith("rootfs.tar.xz"), err[0]
    assert_nothing_unpacked_or_cached(container, env)


def test_keyserver_needs_no_dirmngr(run_download, env, container_args, tmp_path: Path,
                                    image_server: ImageServer, container: Container) -> None:
    """A minimal host with gpg but without dirmngr (Debian's `gpg` package alone) still
    fetches the key: the program speaks HKP itself."""
    env["PATH"] = path_with_only(tmp_path / "bin-without-dirmngr", "xz", "tar", "gpg", "gpgconf", "gpg-agent")
    res = run_download(*container_args, *TESTOS)
    assert res.returncode == 0, show(res)
    assert lookups(image_server), "the key was not fetched from the keyserver"
    assert (container.rootfs / "etc/build").read_text() == "20261127_05:24\n"


def test_unsupported_keyserver_scheme_is_an_error(run_download, container_args, container: Container) -> None:
    res = run_download(*container_args, *TESTOS, "--keyserver", "ldap://keys.example")
    assert res.returncode == 1, show(res)
    err = errors(res)
    assert len(err) == 1 and "Unsupported keyserver ldap://keys.example" in err[0], show(res)
    assert "Traceback" not in res.stderr
    assert os.listdir(str(container.rootfs)) == []


def test_keyid_of_foreign_key_refuses_test_signed_images(run_download, container: Container,
                                                         image_server: ImageServer,
                                                         gpg_keys: GpgKeys, env) -> None:
    res = run_download(*container.shell_args(image_server), "--keyid", gpg_keys.foreign_fpr,
                       *TESTOS)
    assert res.returncode == 1, show(res)
    err = errors(res)
    assert len(err) == 1 and err[0].startswith("ERROR: Invalid signature for "), show(res)
    # the foreign key itself was fetched fine: refusal is about the signer
    assert any(gpg_keys.foreign_fpr in r.query.upper() for r in lookups(image_server))
    assert image_server.count("*/rootfs.tar.xz") == 0
    assert_nothing_unpacked_or_cached(container, env)


def test_no_validate_accepts_foreign_signed_image_with_one_warning(
        run_download, env, private_server: ImageServer, catalog: Catalog,
        gpg_keys: GpgKeys, container: Container) -> None:
    use_private(env, private_server)
    img = catalog.image("testos", "stable", "amd64")
    for rel in ("meta/1.0/index-system.7", img.entry.path.lstrip("/") + "rootfs.tar.xz",
                img.entry.path.lstrip("/") + "meta.tar.xz"):
        gpg_keys.sign(private_server.docroot / rel, "foreign")
    res = run_download(*container.args(private_server, gpg_keys), *TESTOS, "--no-validate")
    assert res.returncode == 0, show(res)
    assert len(warnings(res)) == 1, show(res)
    assert errors(res) == []
    assert "Setting up the GPG keyring" not in res.stdout
    assert lookups(private_server) == []
    assert (container.rootfs / "etc/build").read_text() == "20261127_05:24\n"


# ---------------------------------------------------------------------------
# missing tools
# ---------------------------------------------------------------------------

def test_gpg_missing_while_validating_names_gpg_and_no_validate(run_download, env,
                                                                 container_args,
                                                                 tmp_path: Path,
                                                                 container: Container) -> None:
    env["PATH"] = path_with_only(tmp_path / "bin-without-gpg", "xz", "tar")
    res = run_download(*container_args, *TESTOS)
    assert res.returncode == 1, show(res)
    err = errors(res)
    assert len(err) == 1, show(res)
    assert re.search(r"\bgpg\b", err[0]) and "--no-validate" in err[0], err[0]
    assert "python-gnupg" not in err[0]
    assert "Traceback" not in res.stderr
    assert os.listdir(str(container.rootfs)) == []
    # and with --no-validate the same PATH is enough
    res = run_download(*container_args, *TESTOS, "--no-validate")
    assert res.returncode == 0, show(res)


def test_python_gnupg_missing_while_validating_names_it_and_no_validate(
        run_download, env, container_args, tmp_path: Path, container: Container) -> None:
    shadow = tmp_path / "no-gnupg"
    shadow.mkdir()
    (shadow / "gnupg.py").write_text('raise ImportError("python-gnupg hidden by the test")\n')
    env["PYTHONPATH"] = str(shadow)
    res = run_download(*container_args, *TESTOS)
    assert res.returncode == 1, show(res)
    err = errors(res)
    assert len(err) == 1, show(res)
    assert "python-gnupg" in err[0] and "--no-validate" in err[0], err[0]
    assert "Traceback" not in res.stderr
    assert os.listdir(str(container.rootfs)) == []


# ---------------------------------------------------------------------------
# the user's keyring and the gpg daemons
# ---------------------------------------------------------------------------

def _dir_state(root: Path) -> Dict[str, Tuple[int, int, int]]:
    state = {}
    for dirpath, dirnames, filenames in os.walk(str(root)):
        for name in ["."] + dirnames + filenames:
            full = os.path.join(dirpath, name) if name != "." else dirpath
            st = os.lstat(full)
            state[os.path.relpath(full, str(root))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return state


def test_users_own_gnupg_home_is_never_touched(run_download, env, container_args) -> None:
    home = Path(env["HOME"])
    gnupg_dir = home / ".gnupg"
    gnupg_dir.mkdir(mode=0o700)
    (gnupg_dir / "marker").write_text("the user's keyring\n")
    # a gpg.conf that would break verification if this keyring were used
    (gnupg_dir / "gpg.conf").write_text("no-such-option-lxc-download-test\n")
    past = time.time() - 3600
    for p in (gnupg_dir / "marker", gnupg_dir / "gpg.conf", gnupg_dir):
        os.utime(str(p), (past, past))
    before = _dir_state(gnupg_dir)
    res = run_download(*container_args, *TESTOS)
    assert res.returncode == 0, show(res)
    assert _dir_state(gnupg_dir) == before


def test_no_gnupg_home_created_for_the_user(run_download, env, container_args) -> None:
    home = Path(env["HOME"])
    assert not (home / ".gnupg").exists()
    res = run_download(*container_args, *TESTOS)
    assert res.returncode == 0, show(res)
    assert not os.path.lexists(str(home / ".gnupg"))
    assert sorted(os.listdir(str(home))) == []


@pytest.mark.parametrize("outcome", ["created", "key-fetch-failed", "bad-pubkey-file"])
def test_no_gpg_agent_or_dirmngr_or_gpg_home_left(outcome: str, run_download, env,
                                                  container_args, tmp_path: Path,
                                                  image_server: ImageServer) -> None:
    """After a run (successful or failed after the keyring was set up) no daemon of ours
    runs and no /tmp/lxc-gpg.* home of ours remains."""
    args = list(container_args) + list(TESTOS)
    if outcome == "key-fetch-failed":
        image_server.keyserver_status = 503
    elif outcome == "bad-pubkey-file":
        bad = tmp_path / "not-a-key.asc"
        bad.write_text("this is not an OpenPGP key\n")
        args += ["--pubkey", str(bad)]
    daemons_before = daemons()
    homes_before = set(glob.glob(GPG_HOME_GLOB))
    res = run_download(*args, timeout=120)
    assert "Setting up the GPG keyring" in res.stdout, show(res)
    if outcome == "created":
        assert res.returncode == 0, show(res)
        assert lookups(image_server), "the key was not fetched: dirmngr was never needed"
    else:
        assert res.returncode == 1 and len(errors(res)) == 1, show(res)
    marker = env[MARKER]
    # anything our run started carries our marker in its environment: nothing may remain
    assert settle(processes_with_marker(marker),
                  lambda _: processes_with_marker(marker), 5) == []
    left = settle(daemons() - daemons_before, lambda _: daemons() - daemons_before, 15)
    assert left == set()
    homes = settle(set(glob.glob(GPG_HOME_GLOB)) - homes_before,
                   lambda _: set(glob.glob(GPG_HOME_GLOB)) - homes_before, 15)
    for home in homes:  # still there long after our run ended: ours, leaked; tidy up
        shutil.rmtree(home, ignore_errors=True)
    assert homes == set()
