"""pytest fixtures over tests/support.py: real CA, HTTPS/HTTP image server with a HKP
keyserver, GPG keys, a signed image catalog, and runners for lxc_download.py and for
the Debian shell template."""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import support  # noqa: E402
from support import (Catalog, Container, GpgKeys, ImageServer, Pki)  # noqa: E402

Runner = Callable[..., subprocess.CompletedProcess]


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Test CA + server cert for 127.0.0.1; pki.ca_cert, pki.wgetrc."""
    return support.make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def gpg_keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GpgKeys]:
    """Session keys ('test' with a signing subkey, 'foreign'); agent killed at the end."""
    keys = support.make_gpg_keys(tmp_path_factory.mktemp("gpgkeys"))
    yield keys
    keys.close()


@pytest.fixture(scope="session")
def catalog(tmp_path_factory: pytest.TempPathFactory, gpg_keys: GpgKeys) -> Catalog:
    """The signed session catalog (read-only: tamper only via private_server)."""
    return support.build_catalog(tmp_path_factory.mktemp("catalog"), gpg_keys)


def _start_server(docroot: Path, pki: Pki, keys: GpgKeys) -> ImageServer:
    server = ImageServer(docroot, pki)
    server.add_key(keys.armored("test"), [keys.test_fpr, keys.test_subkey_fpr])
    server.add_key(keys.armored("foreign"), [keys.foreign_fpr])
    return server


@pytest.fixture(scope="session")
def session_server(catalog: Catalog, pki: Pki, gpg_keys: GpgKeys) -> Iterator[ImageServer]:
    server = _start_server(catalog.docroot, pki, gpg_keys)
    yield server
    server.close()


@pytest.fixture
def image_server(session_server: ImageServer) -> Iterator[ImageServer]:
    """The session server, with rules, log and keyserver switch reset for this test."""
    session_server.reset()
    yield session_server
    session_server.reset()


@pytest.fixture
def private_server(tmp_path: Path, catalog: Catalog, pki: Pki,
                   gpg_keys: GpgKeys) -> Iterator[ImageServer]:
    """A fresh server over a private copy of the catalog docroot: tamper freely.
    Point env at it with env['DOWNLOAD_KEYSERVER'] = private_server.keyserver_url."""
    server = _start_server(support.clone_docroot(catalog.docroot, tmp_path / "docroot"),
                           pki, gpg_keys)
    yield server
    server.close()


@pytest.fixture
def env(tmp_path: Path, pki: Pki, image_server: ImageServer) -> Dict[str, str]:
    """os.environ + SSL_CERT_FILE, WGETRC, LXC_CACHE_PATH=<tmp>/cache, HOME=<tmp>/home,
    DOWNLOAD_KEYSERVER=hkp://127.0.0.1:<http port>; proxies and GNUPGHOME removed."""
    return support.make_env(tmp_path, pki, image_server.keyserver_url)


@pytest.fixture
def run_download(env: Dict[str, str], tmp_path: Path) -> Runner:
    """run_download(*args, env=None, input=None, timeout=300) -> CompletedProcess (text)
    running `python lxc_download.py *args`; stdin is /dev/null unless input is given."""
    def run(*args: str, env: Optional[Dict[str, str]] = None, input: Optional[str] = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
        return support.run_cmd([sys.executable, str(support.SCRIPT), *args],
                               env if env is not None else base_env, input, timeout,
                               cwd=tmp_path)
    base_env = env
    return run


@pytest.fixture
def shell_env(env: Dict[str, str], tmp_path: Path) -> Dict[str, str]:
    """env for the shell template, with its own LXC_CACHE_PATH (<tmp>/shell-cache)."""
    return dict(env, LXC_CACHE_PATH=str(tmp_path / "shell-cache"))


@pytest.fixture
def run_shell_template(shell_env: Dict[str, str], tmp_path: Path) -> Runner:
    """run_shell_template(*args, env=None, input=None, timeout=300): the Debian
    /usr/share/lxc/templates/lxc-download (wget, no GPG) with shell_env by default."""
    def run(*args: str, env: Optional[Dict[str, str]] = None, input: Optional[str] = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
        return support.run_cmd([str(support.SHELL_TEMPLATE), *args],
                               env if env is not None else shell_env, input, timeout,
                               cwd=tmp_path)
    return run


@pytest.fixture
def container(tmp_path: Path) -> Container:
    """<tmp>/containers/c1 with config (lxc.net.0.type = empty, lxc.rootfs.path, ...)
    and an empty rootfs/. container.args(server, keys) / .shell_args(server)."""
    return support.make_container(tmp_path / "containers", "c1")


@pytest.fixture
def container_args(container: Container, image_server: ImageServer,
                   gpg_keys: GpgKeys) -> List[str]:
    """--name N --path P --rootfs R --server 127.0.0.1:PORT --keyid <test fpr>."""
    return container.args(image_server, gpg_keys)


@pytest.fixture
def gnupghome() -> Iterator[Path]:
    """A throwaway short GNUPGHOME for tests that drive gpg themselves; daemons killed."""
    home = support.short_gnupghome("lxt")
    yield home
    support.kill_gpg_daemons(home)
    shutil.rmtree(str(home), ignore_errors=True)


@pytest.fixture
def reap_our_gpg_daemons(env: Dict[str, str]) -> Iterator[None]:
    """Mark each run's environment; at teardown stop what still carries the mark and remove
    the lxc-gpg home it names, so a leak found by one test does not pile up (the tests
    still see the leak: this runs after them)."""
    env[support.RUN_MARKER] = uuid.uuid4().hex
    yield
    support.reap_marked(env[support.RUN_MARKER])
