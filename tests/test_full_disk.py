"""A full disk (issue 3): a cache or a rootfs on a real, small, full tmpfs gives an
`ERROR:` that says so, no traceback, and the previous cache stays whole."""

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

import support

OLD, NEW = "20261101_00:00", "20261127_05:24"
IMAGE = ["-d", "testos", "-r", "stable", "-a", "amd64"]


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(mnt: Path, leave: int = 32 * 1024) -> Path:
    """Leave only `leave` bytes free on the filesystem."""
    filler = mnt / "filler"
    st = os.statvfs(mnt)
    with open(filler, "wb") as f:
        f.truncate(0)
        remaining = st.f_bavail * st.f_frsize - leave
        block = b"\0" * (1 << 20)
        while remaining > 0:
            remaining -= f.write(block[:min(len(block), remaining)])
    return filler


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def publish_only(server, catalog, keys, build):
    entry = catalog.image("testos", "stable", "amd64", build=build).entry
    support.write_index(server.docroot, "system", [entry], keys=keys)


def test_full_cache_disk_is_an_error_and_keeps_the_previous_cache(run_download, env, container, catalog,
                                                                   private_server, gpg_keys, small_tmpfs):
    env.update(LXC_CACHE_PATH=str(small_tmpfs / "cache"), DOWNLOAD_KEYSERVER=private_server.keyserver_url)
    args = container.args(private_server, gpg_keys) + IMAGE
    publish_only(private_server, catalog, gpg_keys, OLD)
    assert run_download(*args, env=env).returncode == 0
    cache = small_tmpfs / "cache/download/testos/stable/amd64/default"
    before = sha(cache / "rootfs.tar.xz")

    publish_only(private_server, catalog, gpg_keys, NEW)
    (cache / "expiry").write_text("1\n")
    filler = fill(small_tmpfs)
    r = run_download(*args, env=env)
    assert r.returncode == 1
    assert "ERROR: No space left on device" in r.stderr
    assert "Traceback" not in r.stderr
    assert (cache / "build_id").read_text() == OLD + "\n"
    assert sha(cache / "rootfs.tar.xz") == before
    assert not [p.name for p in cache.parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]

    filler.unlink()
    r = run_download(*args, env=env)
    assert r.returncode == 0, r.stderr
    assert (cache / "build_id").read_text() == NEW + "\n"


def test_full_rootfs_disk_is_an_error_and_keeps_the_cache(run_download, env, tmp_path, image_server, gpg_keys,
                                                           small_tmpfs):
    good = support.make_container(tmp_path / "good")
    assert run_download(*good.args(image_server, gpg_keys), *IMAGE, env=env).returncode == 0
    cache = Path(env["LXC_CACHE_PATH"]) / "download/testos/stable/amd64/default"
    before = sha(cache / "rootfs.tar.xz")

    full = support.make_container(small_tmpfs / "ct")
    fill(small_tmpfs)
    image_server.clear_log()
    r = run_download(*full.args(image_server, gpg_keys), *IMAGE, env=env)
    assert r.returncode == 1
    assert "ERROR: No space left on device" in r.stderr
    assert "Traceback" not in r.stderr
    assert sha(cache / "rootfs.tar.xz") == before
    assert (cache / "build_id").read_text() == NEW + "\n"
    assert image_server.count("*rootfs.tar.xz") == 0
