"""At a terminal and in scripts (issue 5): progress on a real pseudo-terminal and never
elsewhere, JSON listings, pinned builds, errors that say what exists, --verbose,
and the two ways to install (pip, or the file copied alone)."""

import json
import os
import pty
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import support

REPO = Path(__file__).resolve().parent.parent
PROGRAM = REPO / "lxc_download.py"
IMAGE = ["-d", "testos", "-r", "stable", "-a", "amd64"]
PROGRESS_LINES = ["Downloading the image index", "Downloading the rootfs", "Downloading the metadata",
                  "The image cache is now ready", "Unpacking the rootfs"]


def run_with_tty_stderr(args, env, timeout=120):
    """Run the program with stderr on a pseudo-terminal and stdout on a pipe."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, str(PROGRAM), *args], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the program closed its end
                break
            if not chunk:
                break
            seen += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    stdout = proc.stdout.read().decode()
    proc.wait(timeout=30)
    return proc.returncode, stdout, seen.decode(errors="replace")


def test_progress_line_on_a_terminal_ends_cleanly(container_args, env, image_server):
    image_server.add_rule("*/rootfs.tar.xz", support.delay(0.5))
    code, stdout, tty = run_with_tty_stderr([*container_args, *IMAGE], env)
    assert code == 0, tty
    assert "rootfs.tar.xz" in tty and "%" in tty and "/s" in tty and "ETA" in tty
    assert tty.endswith("\r\x1b[K"), repr(tty[-80:])  # the live line is wiped at the end
    assert "\r" not in stdout
    assert [line for line in stdout.splitlines() if line in PROGRESS_LINES] == PROGRESS_LINES


def test_no_progress_and_no_carriage_return_when_not_a_terminal(run_download, container_args, env):
    r = run_download(*container_args, *IMAGE, env=env)
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stdout and "\r" not in r.stderr
    assert "ETA" not in r.stderr and "%" not in r.stderr
    assert [line for line in r.stdout.splitlines() if line in PROGRESS_LINES] == PROGRESS_LINES


def test_list_format_json_prints_only_json(run_download, env, image_server, gpg_keys):
    r = run_download("--list", "--format", "json", "--server", image_server.host, "--keyid", gpg_keys.test_fpr,
                     env=env)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert {"dist": "testos", "release": "stable", "arch": "amd64", "variant": "cloud",
            "build": "20261127_05:24",
            "path": "/images/testos/stable/amd64/cloud/20261127_05:24/"} in rows
    assert all(set(row) == {"dist", "release", "arch", "variant", "build", "path"} for row in rows)
    assert "Downloading the image index" in r.stderr


def test_list_json_filters_combine(run_download, env, image_server, gpg_keys):
    r = run_download("--list", "--format=json", "-d", "testos", "--variant", "default", "--server",
                     image_server.host, "--keyid", gpg_keys.test_fpr, env=env)
    rows = json.loads(r.stdout)
    assert sorted(row["build"] for row in rows) == ["20261101_00:00", "20261127_05:24"]
    assert {row["variant"] for row in rows} == {"default"}


def test_missing_image_names_what_is_available(run_download, container_args, env):
    r = run_download(*container_args, "-d", "testos", "-r", "stable", "-a", "s390x", env=env)
    assert r.returncode == 1
    assert "ERROR: Couldn't find a matching image" in r.stderr
    assert "Available architectures for testos stable: amd64" in r.stderr
    r = run_download(*container_args, "-d", "testos", "-r", "oldstable", "-a", "amd64", env=env)
    assert "Available releases for testos: stable" in r.stderr
    r = run_download(*container_args, "-d", "nosuch", "-r", "1", "-a", "amd64", env=env)
    assert "Available distributions: otheros, single, testos" in r.stderr


def test_pinned_build_is_used_and_leaves_the_cache_alone(run_download, container_args, env, container,
                                                           image_server):
    first = run_download(*container_args, *IMAGE, env=env)
    assert first.returncode == 0, first.stderr
    cache = Path(env["LXC_CACHE_PATH"]) / "download/testos/stable/amd64/default"
    before = (cache / "build_id").read_text()
    image_server.clear_log()
    r = run_download(*container_args, *IMAGE, "--build", "20261101_00:00", env=env)
    assert r.returncode == 0, r.stderr
    assert (container.rootfs / "etc/build").read_text().strip() == "20261101_00:00"
    assert image_server.count("*/20261101_00:00/rootfs.tar.xz.asc") == 1  # still verified
    assert (cache / "build_id").read_text() == before == "20261127_05:24\n"
    assert not [p for p in cache.parent.iterdir() if ".partial-" in p.name]


def test_pinned_build_that_does_not_exist_lists_the_builds(run_download, container_args, env):
    r = run_download(*container_args, *IMAGE, "--build", "19990101_00:00", env=env)
    assert r.returncode == 1
    assert "ERROR: Couldn't find build 19990101_00:00" in r.stderr
    assert "Available builds: 20261101_00:00, 20261127_05:24" in r.stderr


def test_verbose_shows_urls_and_signer(run_download, container_args, env, image_server, gpg_keys):
    r = run_download(*container_args, *IMAGE, "--verbose", env=env)
    assert r.returncode == 0, r.stderr
    base = image_server.https_url
    assert f"Fetching {base}/meta/1.0/index-system.7" in r.stderr
    assert f"Fetching {base}/images/testos/stable/amd64/default/20261127_05:24/rootfs.tar.xz" in r.stderr
    assert r.stderr.count(f"good signature by {gpg_keys.test_fpr}") == 3  # index, rootfs, meta


def test_file_runs_when_copied_alone(tmp_path, env, image_server, gpg_keys):
    alone = tmp_path / "bin" / "lxc-download"
    alone.parent.mkdir()
    shutil.copy(PROGRAM, alone)
    r = subprocess.run([sys.executable, str(alone), "--list", "--server", image_server.host, "--keyid",
                        gpg_keys.test_fpr], env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "single   one" in r.stdout


def test_pip_install_gives_an_lxc_download_command(tmp_path, env, image_server, gpg_keys):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "build"))
    pip = subprocess.run([str(venv / "bin/pip"), "install", "-q", "--no-deps", str(src)],
                         capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr
    r = subprocess.run([str(venv / "bin/lxc-download"), "--list", "-d", "otheros", "--server", image_server.host,
                        "--keyid", gpg_keys.test_fpr], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "otheros  1.0      arm64  default  20261120_00:00" in r.stdout


def test_arch_defaults_to_the_host_architecture(run_download, container_args, env, container):
    import platform

    expected = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine())
    if expected != "amd64":
        # the catalog's images are amd64: elsewhere, show the default by its error
        r = run_download(*container_args, "-d", "testos", "-r", "stable", env=env)
        assert "Available architectures for testos stable: amd64" in r.stderr
        return
    r = run_download(*container_args, "-d", "testos", "-r", "stable", env=env)
    assert r.returncode == 0, r.stderr
    assert "Distribution:" not in r.stdout and "Architecture:" not in r.stdout
    assert (container.rootfs / "etc/build").read_text().strip() == "20261127_05:24"


def test_interactive_mode_offers_choices_and_the_default_arch(run_download, container_args, env, container):
    r = run_download(*container_args, input="testos\nstable\n\n", env=env)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "Available distributions: otheros, single, testos" in out
    assert "Available releases for testos: stable" in out
    assert "Available architectures for testos stable: amd64 (default: " in out
    assert out.index("Distribution: ") < out.index("Release: ") < out.index("Architecture: ")
    assert (container.rootfs / "etc/build").exists()


def test_interactive_mode_at_end_of_input_is_an_error(run_download, container_args, env):
    r = run_download(*container_args, "-d", "testos", input="", env=env)
    assert r.returncode == 1
    assert "ERROR:" in r.stderr and "standard input is closed" in r.stderr
    assert "Traceback" not in r.stderr


def oldest_python() -> str:
    """A Python 3.8 to run the program with: on PATH, or one pyenv keeps."""
    import glob

    kept = sorted(glob.glob("/root/.pyenv/versions/3.8*/bin/python3"))
    on_path = shutil.which("python3.8")
    if on_path and "/shims/" not in on_path:  # a pyenv shim only works where pyenv has 3.8
        kept.append(on_path)
    return kept[0] if kept else ""


@pytest.mark.skipif(not oldest_python(), reason="no Python 3.8 here (vermin checks 3.8 syntax in CI)")
def test_creates_on_python_3_8(container_args, env, container):
    import gnupg

    env = dict(env, PYTHONPATH=str(Path(gnupg.__file__).parent))  # python-gnupg is one pure-Python file
    r = subprocess.run([oldest_python(), str(PROGRAM), *container_args, *IMAGE], env=env,
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (container.rootfs / "etc/build").read_text().strip() == "20261127_05:24"
    assert (container.rootfs / support.SUBSECOND_FILE).stat().st_mtime_ns == support.SUBSECOND_MTIME_NS
