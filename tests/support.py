"""Real test infrastructure for lxc_download.py: a test CA, an HTTPS/HTTP image server
with a HKP keyserver and fault hooks, GPG keys, distrobuilder-style images, and a
tree snapshot to compare unpacked rootfs trees.

Plain helpers (no pytest here) so they can be used from conftest.py, from scripts and
by hand.  Everything is real: openssl, gpg, tar, xz, sockets.  Needs root (mknod, chown).
"""

from __future__ import annotations

import fnmatch
import io
import http.server
import os
import re
import shutil
import signal
import socket
import ssl
import stat
import struct
import subprocess
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union
from urllib.parse import parse_qs, unquote, urlsplit

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "lxc_download.py"
SHELL_TEMPLATE = Path("/usr/share/lxc/templates/lxc-download")

PROXY_VARS = ("http_proxy", "https_proxy", "no_proxy", "all_proxy", "ftp_proxy")

# ---------------------------------------------------------------------------
# Test CA
# ---------------------------------------------------------------------------

_OPENSSL_CNF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = placeholder
[ca_ext]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server_ext]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1,DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


@dataclass
class Pki:
    """A throwaway CA and a server certificate for 127.0.0.1/localhost."""

    dir: Path
    ca_cert: Path  # PEM; clients trust it via SSL_CERT_FILE (Python) or WGETRC (wget)
    server_cert: Path
    server_key: Path
    wgetrc: Path  # "ca_certificate = <ca_cert>" for wget and the shell template

    def server_context(self) -> ssl.SSLContext:
        """TLS context for the test server."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(self.server_cert), str(self.server_key))
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """TLS context that trusts only the test CA (for in-process checks)."""
        return ssl.create_default_context(cafile=str(self.ca_cert))


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=str(cwd), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def make_pki(directory: Path) -> Pki:
    """Create a CA (strict X.509 extensions, so Python 3.13's VERIFY_X509_STRICT is
    happy too) and a server cert signed by it, with the openssl CLI."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "openssl.cnf").write_text(_OPENSSL_CNF)
    key_opts = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", "-new", "-config", "openssl.cnf", "-extensions", "ca_ext",
             *key_opts, "-keyout", "ca.key", "-out", "ca.pem", "-days", "3650",
             "-subj", "/CN=lxc-download test CA", cwd=d)
    _openssl("req", "-new", "-config", "openssl.cnf", *key_opts, "-keyout", "server.key",
             "-out", "server.csr", "-subj", "/CN=127.0.0.1", cwd=d)
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-set_serial", str(int.from_bytes(os.urandom(8), "big")), "-days", "825",
             "-extfile", "openssl.cnf", "-extensions", "server_ext", "-out", "server.pem",
             cwd=d)
    wgetrc = d / "wgetrc"
    wgetrc.write_text("ca_certificate = %s\n" % (d / "ca.pem"))
    return Pki(d, d / "ca.pem", d / "server.pem", d / "server.key", wgetrc)


# ---------------------------------------------------------------------------
# GPG keys
# ---------------------------------------------------------------------------

@dataclass
class GpgKeys:
    """Session keyring: "LXC test images" (certify-only primary + ed25519 signing
    subkey, so every signature is a subkey signature) and an unrelated "foreign" key."""

    home: Path
    test_fpr: str  # primary fingerprint: what --keyid names
    test_subkey_fpr: str  # the key that actually makes the signatures
    foreign_fpr: str
    test_pubkey: Path  # armored public key, test key only
    foreign_pubkey: Path  # armored public key, foreign key only

    def gpg(self, *args: str, check: bool = True,
            input: Optional[bytes] = None) -> subprocess.CompletedProcess:
        """Run gpg on the session home (batch, no tty, unprotected keys)."""
        return run_gpg(self.home, *args, check=check, input=input)

    def fpr(self, key: str) -> str:
        return {"test": self.test_fpr, "foreign": self.foreign_fpr}[key]

    def armored(self, key: str) -> str:
        """Armored public key text of 'test' or 'foreign'."""
        return {"test": self.test_pubkey, "foreign": self.foreign_pubkey}[key].read_text()

    def sign(self, path: Union[str, Path], key: str = "test") -> Path:
        """Write a detached ASCII-armored signature `path.asc`, as the image server does."""
        path = Path(path)
        asc = Path(str(path) + ".asc")
        self.gpg("--yes", "--armor", "--detach-sign", "--local-user", self.fpr(key),
                 "--output", str(asc), str(path))
        return asc

    def close(self) -> None:
        """Stop the gpg-agent/dirmngr started for this home and remove it."""
        kill_gpg_daemons(self.home)
        shutil.rmtree(str(self.home), ignore_errors=True)


def run_gpg(home: Path, *args: str, check: bool = True,
            input: Optional[bytes] = None) -> subprocess.CompletedProcess:
    """gpg with an explicit GNUPGHOME; stdout/stderr captured as bytes."""
    env = dict(os.environ, GNUPGHOME=str(home))
    for var in PROXY_VARS:
        env.pop(var, None)
        env.pop(var.upper(), None)
    cmd = ["gpg", "--batch", "--no-tty", "--pinentry-mode", "loopback", "--passphrase", "",
           *args]
    return subprocess.run(cmd, env=env, check=check, input=input,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def kill_gpg_daemons(home: Path) -> None:
    """gpg-agent and dirmngr outlive gpg; they must be killed per GNUPGHOME."""
    subprocess.run(["gpgconf", "--kill", "all"], env=dict(os.environ, GNUPGHOME=str(home)),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def short_gnupghome(prefix: str = "lxg") -> Path:
    """A 0700 dir under /tmp with a short name: gpg-agent's socket path is length-limited."""
    home = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    home.chmod(0o700)
    return home


def key_fingerprints(home: Path, uid: str) -> List[str]:
    """Fingerprints of a key as [primary, subkey...] from gpg's colon listing."""
    out = run_gpg(home, "--with-colons", "--fingerprint", "--fingerprint", "--list-keys",
                  uid).stdout.decode()
    return [line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:")]


def make_gpg_keys(out_dir: Path) -> GpgKeys:
    """Generate the session keys (ed25519: fast) and export their public halves."""
    home = short_gnupghome()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    test_uid = "LXC test images <lxc-test@example.invalid>"
    run_gpg(home, "--quick-gen-key", test_uid, "ed25519", "cert", "0")
    test_fpr = key_fingerprints(home, test_uid)[0]
    run_gpg(home, "--quick-add-key", test_fpr, "ed25519", "sign", "0")
    test_fpr, test_sub = key_fingerprints(home, test_uid)[:2]
    foreign_uid = "Foreign signer <foreign@example.invalid>"
    run_gpg(home, "--quick-gen-key", foreign_uid, "ed25519", "sign", "0")
    foreign_fpr = key_fingerprints(home, foreign_uid)[0]
    pubs = {}
    for name, fpr in (("test", test_fpr), ("foreign", foreign_fpr)):
        pubs[name] = out_dir / ("%s-pubkey.asc" % name)
        pubs[name].write_bytes(run_gpg(home, "--armor", "--export", fpr).stdout)
    return GpgKeys(home, test_fpr, test_sub, foreign_fpr, pubs["test"], pubs["foreign"])


# ---------------------------------------------------------------------------
# HTTP(S) image server with a HKP keyserver and fault hooks
# ---------------------------------------------------------------------------

# A fault action gets the request handler and returns True when it fully answered the
# request (the normal file serving is then skipped), False to fall through to it.
Action = Callable[["Handler"], bool]


@dataclass
class Rule:
    """Apply `action` to requests whose normalised path matches `pattern` (exact or an
    fnmatch glob, where `*` also matches `/`), `times` times (None: for ever)."""

    pattern: str
    action: Action
    times: Optional[int] = None
    hits: int = 0

    def matches(self, path: str) -> bool:
        return path == self.pattern or fnmatch.fnmatchcase(path, self.pattern)


@dataclass(frozen=True)
class Request:
    """One logged request, as the server understood it."""

    scheme: str  # "https" or "http"
    method: str
    path: str  # slashes collapsed, percent-decoded, no query
    query: str
    range: Optional[str]
    user_agent: Optional[str]


def status(code: int = 500, body: bytes = b"") -> Action:
    """Answer with an HTTP error status (e.g. add_rule(p, status(404), times=2))."""
    def action(h: "Handler") -> bool:
        h.send_bytes(code, body or ("%d test fault\n" % code).encode())
        return True
    return action


def redirect(location: str, code: int = 302) -> Action:
    """Redirect to an absolute URL (e.g. server.http_url + path for HTTPS->HTTP)."""
    def action(h: "Handler") -> bool:
        h.send_bytes(code, b"", {"Location": location})
        return True
    return action


def redirect_to_path(server: "ImageServer", scheme: str = "https", code: int = 302,
                     prefix: str = "") -> Action:
    """Redirect to the same path (behind `prefix`) on this server's `scheme` side."""
    def action(h: "Handler") -> bool:
        base = server.https_url if scheme == "https" else server.http_url
        h.send_bytes(code, b"", {"Location": base + prefix + h.url_path})
        return True
    return action


def truncate(after: int, stall: float = 0.0) -> Action:
    """Serve the file (honouring Range) with its full Content-Length but drop the
    connection after `after` body bytes, optionally stalling `stall` s first."""
    def action(h: "Handler") -> bool:
        h.send_file(cut_after=after, stall=stall)
        return True
    return action


def stall(seconds: float, after: Optional[int] = None) -> Action:
    """Hang: before any response (after=None) or after `after` body bytes, then close."""
    def action(h: "Handler") -> bool:
        if after is None:
            time.sleep(seconds)
            h.close_connection = True
            h.abort()
        else:
            h.send_file(cut_after=after, stall=seconds)
        return True
    return action


def delay(seconds: float) -> Action:
    """Sleep, then serve normally."""
    def action(h: "Handler") -> bool:
        time.sleep(seconds)
        return False
    return action


def serve_bytes(data: bytes, code: int = 200) -> Action:
    """Serve these bytes instead of the file (tampering without touching the docroot)."""
    def action(h: "Handler") -> bool:
        h.send_bytes(code, data)
        return True
    return action


class Handler(http.server.BaseHTTPRequestHandler):
    """Request handler; all policy lives in ImageServer, reached via self.server.owner."""

    server_version = "lxc-test-server/1.0"
    timeout = 60  # a stuck client must not pin a thread for ever
    url_path = ""
    query = ""

    def setup(self) -> None:
        # TLS handshake here, in the handler thread, not in the accept loop.
        ctx = getattr(self.server, "tls", None)
        if ctx is not None:
            self.request = ctx.wrap_socket(self.request, server_side=True)
        super().setup()

    def log_message(self, *args: Any) -> None:  # quiet: tests read server.requests
        pass

    @property
    def owner(self) -> "ImageServer":
        return self.server.owner  # type: ignore[attr-defined]

    def do_GET(self) -> None:
        self.owner.dispatch(self)

    do_HEAD = do_GET

    def abort(self) -> None:
        """Close the TCP connection now, without a proper end of body."""
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.close_connection = True

    def send_bytes(self, code: int, data: bytes,
                   headers: Optional[Dict[str, str]] = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "text/plain" if code != 200 else
                         "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_file(self, cut_after: Optional[int] = None, stall: float = 0.0) -> None:
        """Serve the docroot file for url_path; `Range: bytes=N-[M]` gives a 206."""
        fs_path = self.owner.fs_path(self.url_path)
        if fs_path is None or not fs_path.is_file():
            self.send_bytes(404, b"not found\n")
            return
        size = fs_path.stat().st_size
        start, end = 0, size - 1
        rng = self.headers.get("Range")
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip()) if rng else None
        if m:
            start = int(m.group(1))
            end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
            if start >= size:
                self.send_bytes(416, b"", {"Content-Range": "bytes */%d" % size})
                return
        self.send_response(206 if m else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        if m:
            self.send_header("Content-Range", "bytes %d-%d/%d" % (start, end, size))
        self.end_headers()
        if self.command == "HEAD":
            return
        self._copy_body(fs_path, start, end - start + 1, cut_after, stall)

    def _copy_body(self, fs_path: Path, start: int, length: int,
                   cut_after: Optional[int], stall: float) -> None:
        limit = length if cut_after is None else min(length, cut_after)
        with fs_path.open("rb") as f:
            f.seek(start)
            while limit > 0:
                chunk = f.read(min(65536, limit))
                if not chunk:
                    break
                self.wfile.write(chunk)
                limit -= len(chunk)
        if cut_after is not None and cut_after < length:
            self.wfile.flush()
            time.sleep(stall)
            self.abort()


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, owner: "ImageServer", tls: Optional[ssl.SSLContext]) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.owner = owner
        self.tls = tls

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that hang up (or fail TLS on purpose) are not server errors


class ImageServer:
    """An HTTPS server and a plain-HTTP server on 127.0.0.1 sharing one docroot, one
    request log, one rule list and one HKP keyserver (/pks/lookup)."""

    def __init__(self, docroot: Path, pki: Pki) -> None:
        self.docroot = Path(docroot)
        self._lock = threading.Lock()
        self._log: List[Request] = []
        self._rules: List[Rule] = []
        self.keys: Dict[str, str] = {}  # upper-case fingerprint -> armored key
        self.keyserver_status: Optional[int] = None  # set: keyserver answers this
        self._https = _HTTPServer(self, pki.server_context())
        self._http = _HTTPServer(self, None)
        self._threads = [threading.Thread(target=s.serve_forever, daemon=True)
                         for s in (self._https, self._http)]
        for t in self._threads:
            t.start()

    # --- addresses -------------------------------------------------------
    @property
    def https_port(self) -> int:
        return self._https.server_address[1]

    @property
    def http_port(self) -> int:
        return self._http.server_address[1]

    @property
    def host(self) -> str:
        """What --server takes: `127.0.0.1:<https port>`."""
        return "127.0.0.1:%d" % self.https_port

    @property
    def https_url(self) -> str:
        return "https://%s" % self.host

    @property
    def http_url(self) -> str:
        return "http://127.0.0.1:%d" % self.http_port

    @property
    def keyserver_url(self) -> str:
        """The keyserver role belongs to the plain-HTTP side (hkp is plain HTTP)."""
        return "hkp://127.0.0.1:%d" % self.http_port

    # --- request log -----------------------------------------------------
    @property
    def requests(self) -> List[Request]:
        with self._lock:
            return list(self._log)

    def paths(self) -> List[str]:
        return [r.path for r in self.requests]

    def count(self, pattern: str) -> int:
        """How many requests matched an exact path or fnmatch glob."""
        return sum(1 for p in self.paths() if p == pattern or fnmatch.fnmatchcase(p, pattern))

    def clear_log(self) -> None:
        with self._lock:
            self._log.clear()

    # --- fault rules -----------------------------------------------------
    def add_rule(self, pattern: str, action: Action, times: Optional[int] = None) -> Rule:
        """Register a fault; first live matching rule wins. Returns the rule (its
        `hits` tells how often it fired)."""
        rule = Rule(pattern, action, times)
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear_rules(self) -> None:
        with self._lock:
            self._rules.clear()

    def reset(self) -> None:
        """Back to a clean state between tests."""
        self.clear_rules()
        self.clear_log()
        self.keyserver_status = None

    def _take_rule(self, path: str) -> Optional[Rule]:
        with self._lock:
            for rule in self._rules:
                if (rule.times is None or rule.hits < rule.times) and rule.matches(path):
                    rule.hits += 1
                    return rule
        return None

    # --- keyserver -------------------------------------------------------
    def add_key(self, armored: str, fingerprints: Sequence[str]) -> None:
        """Make the keyserver know a key under its primary (and subkey) fingerprints."""
        for fpr in fingerprints:
            self.keys[fpr.upper()] = armored

    def _lookup_key(self, search: str) -> Optional[str]:
        want = search.upper()
        want = want[2:] if want.startswith("0X") else want
        if len(want) < 8 or not re.fullmatch(r"[0-9A-F]+", want):
            return None
        for fpr, armored in self.keys.items():
            if fpr.endswith(want):
                return armored
        return None

    def _keyserver(self, h: Handler) -> None:
        if self.keyserver_status is not None:
            h.send_bytes(self.keyserver_status, b"keyserver down (test)\n")
            return
        q = parse_qs(h.query)
        armored = self._lookup_key(q.get("search", [""])[0])
        if q.get("op", [""])[0] != "get" or armored is None:
            h.send_bytes(404, b"No results found\n")
            return
        h.send_bytes(200, armored.encode(), {"Content-Type": "application/pgp-keys"})

    # --- dispatch --------------------------------------------------------
    def fs_path(self, url_path: str) -> Optional[Path]:
        """Docroot file for a normalised URL path; None if it would escape."""
        parts = [p for p in url_path.split("/") if p]
        if any(p in (".", "..") for p in parts):
            return None
        return self.docroot.joinpath(*parts) if parts else self.docroot

    def dispatch(self, h: Handler) -> None:
        split = urlsplit(h.path)
        h.url_path = re.sub(r"/+", "/", unquote(split.path)) or "/"
        h.query = split.query
        scheme = "https" if h.server.tls is not None else "http"  # type: ignore
        with self._lock:
            self._log.append(Request(scheme, h.command, h.url_path, split.query,
                                     h.headers.get("Range"), h.headers.get("User-Agent")))
        rule = self._take_rule(h.url_path)
        if rule is not None and rule.action(h):
            return
        if h.url_path == "/pks/lookup":
            self._keyserver(h)
        else:
            h.send_file()

    def close(self) -> None:
        for s in (self._https, self._http):
            s.shutdown()
            s.server_close()


# ---------------------------------------------------------------------------
# Images, as distrobuilder makes them
# ---------------------------------------------------------------------------

# The distribution config in meta.tar.xz. Module-level so tests that start a container
# can adjust it (e.g. support.META_CONFIG = ...) before building their own images.
META_CONFIG = "lxc.include = LXC_TEMPLATE_CONFIG/common.conf\nlxc.arch = x86_64\n"
META_CONFIG_USER_EXTRA = "lxc.include = LXC_TEMPLATE_CONFIG/userns.conf\n"
CREATE_MESSAGE = "You just created a test container (LXC_NAME)\n"
EXCLUDES_USER = "./dev/null\n./dev/zero\n./dev/loop9\n"

BUSYBOX_APPLETS = ("sh", "hostname", "cat", "ls", "stat", "id", "true", "sleep",
                   "echo", "readlink")
FIXED_MTIME = 1764201600  # 2025-11-27: every entry gets it, so trees are comparable
OLD_MTIME = 946684800  # 2000-01-01: etc/old-file
SUBSECOND_FILE = "etc/subsecond"  # a real tree's mtimes have fractions (GNU tar keeps ns in pax)
SUBSECOND_MTIME_NS = FIXED_MTIME * 10**9 + 123456789
LONG_DIR = "usr/share/long/" + "d" * 60 + "/" + "e" * 60  # path well over 100 chars
LONG_NAME = "n" * 200  # one 200-char component
NON_ASCII = "données/über-ñ.txt"
TTY_CONF = "exec /sbin/mingetty tty1\n"
CAP_FILE = "usr/bin/ping-cap"
XATTR_FILE = "etc/xattr-file"
# security.capability, VFS_CAP_REVISION_2 | EFFECTIVE, permitted = CAP_NET_RAW (13):
# what `setcap cap_net_raw+ep` writes as root in the initial user namespace.
CAP_NET_RAW_EP = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)


def _write(root: Path, rel: str, data: Union[str, bytes], mode: int = 0o644,
           owner: Tuple[int, int] = (0, 0)) -> Path:
    """Create a file; order matters: chown clears setuid and capabilities, so chown,
    then chmod (xattrs are set by the caller after)."""
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    os.chown(str(p), *owner)
    os.chmod(str(p), mode)
    return p


def _mkdir(root: Path, rel: str, mode: int = 0o755, owner: Tuple[int, int] = (0, 0)) -> Path:
    p = root / rel
    p.mkdir(parents=True, exist_ok=True)
    os.chown(str(p), *owner)
    os.chmod(str(p), mode)
    return p


def _install_busybox(root: Path) -> None:
    _mkdir(root, "bin")
    shutil.copy2("/bin/busybox", str(root / "bin/busybox"))
    os.chmod(str(root / "bin/busybox"), 0o755)
    for applet in BUSYBOX_APPLETS:
        os.symlink("busybox", str(root / "bin" / applet))


def _add_special_files(root: Path) -> None:
    """Everything that is hard to unpack right: devices, fifo, modes, links, names,
    owners, xattrs."""
    _mkdir(root, "dev")
    os.mknod(str(root / "dev/null"), 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(str(root / "dev/zero"), 0o666 | stat.S_IFCHR, os.makedev(1, 5))
    os.mknod(str(root / "dev/loop9"), 0o660 | stat.S_IFBLK, os.makedev(7, 9))
    _mkdir(root, "run")
    os.mkfifo(str(root / "run/test.fifo"), 0o600)
    os.chmod(str(root / "run/test.fifo"), 0o600)
    _write(root, "usr/bin/suid-tool", "#!/bin/sh\necho suid\n", 0o4755)
    _mkdir(root, "srv/setgid-dir", 0o2775)
    _mkdir(root, "tmp", 0o1777)
    hard = _write(root, "usr/share/hard/a.txt", "same inode\n")
    os.link(str(hard), str(root / "usr/share/hard/b.txt"))
    _mkdir(root, "usr/lib")
    os.symlink("../share/hard/a.txt", str(root / "usr/lib/rel-link"))
    os.symlink("/etc/hostname", str(root / "etc/abs-link"))
    os.symlink("/nonexistent/dangling-target", str(root / "etc/dangling"))
    _write(root, LONG_DIR + "/file-in-long-dir", "long path\n")
    _write(root, "usr/share/long/" + LONG_NAME, "long name\n")
    _write(root, NON_ASCII, "non-ascii\n")
    os.setxattr(str(_write(root, XATTR_FILE, "xattr\n")), "user.test", b"hello")
    os.setxattr(str(_write(root, CAP_FILE, "#!/bin/sh\n", 0o755)), "security.capability",
                CAP_NET_RAW_EP)
    _mkdir(root, "home/user", 0o750, (1000, 1000))
    _write(root, "home/user/file.txt", "user file\n", 0o640, (1000, 1000))
    _write(root, "home/user/other-gid", "gid 1001\n", 0o644, (1000, 1001))
    _write(root, "usr/share/readonly/file.txt", "read only\n", 0o444)
    os.chmod(str(root / "usr/share/readonly"), 0o555)
    _write(root, "etc/old-file", "old\n")


def _set_mtimes(root: Path, overrides: Dict[str, int]) -> None:
    """Fixed mtimes everywhere (children before parents), then per-path overrides."""
    for dirpath, dirnames, filenames in os.walk(str(root), topdown=False):
        for name in filenames + dirnames:
            os.utime(os.path.join(dirpath, name), (FIXED_MTIME, FIXED_MTIME),
                     follow_symlinks=False)
    for rel, t in overrides.items():
        os.utime(str(root / rel), (t, t), follow_symlinks=False)
    os.utime(str(root), (FIXED_MTIME, FIXED_MTIME))


def build_rootfs(dest: Path, build_id: str, tty_conf: bool = False,
                 extra_files: Optional[Dict[str, Union[str, bytes]]] = None,
                 hook: Optional[Callable[[Path], None]] = None) -> Path:
    """Build a small but nasty rootfs tree at `dest` (busybox, /etc/hostname=LXC_NAME,
    /etc/build=<build_id>, and _add_special_files). `extra_files` adds/overrides
    regular files; `hook(root)` may change anything before mtimes are fixed."""
    root = Path(dest)
    root.mkdir(parents=True)
    os.chmod(str(root), 0o755)
    _install_busybox(root)
    _write(root, "etc/hostname", "LXC_NAME\n")
    _write(root, "etc/build", build_id + "\n")
    _add_special_files(root)
    if tty_conf:
        _write(root, "etc/init/tty.conf", TTY_CONF)
    for rel, data in (extra_files or {}).items():
        _write(root, rel, data)
    if hook is not None:
        hook(root)
    _write(root, SUBSECOND_FILE, "modified at a fraction of a second\n")
    _set_mtimes(root, {"etc/old-file": OLD_MTIME})
    os.utime(str(root / SUBSECOND_FILE), ns=(SUBSECOND_MTIME_NS, SUBSECOND_MTIME_NS))
    return root


def pack_tar_xz(tree: Path, out: Path) -> Path:
    """Exactly distrobuilder's packing: members named ./..., numeric owners, all xattrs."""
    with open(str(out), "wb") as f:
        tar = subprocess.Popen(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*",
                                "-cf", "-", "-C", str(tree), "."], stdout=subprocess.PIPE)
        xz = subprocess.run(["xz", "--threads=0", "-c"], stdin=tar.stdout, stdout=f)
        tar.stdout.close()  # type: ignore[union-attr]
        if tar.wait() != 0 or xz.returncode != 0:
            raise RuntimeError("packing %s failed" % tree)
    return Path(out)


def default_meta_files(expiry: Optional[int] = None) -> Dict[str, str]:
    """The meta.tar.xz files of an image (see module constants)."""
    expiry = int(time.time()) + 30 * 86400 if expiry is None else expiry
    user = META_CONFIG + META_CONFIG_USER_EXTRA
    files = {"config": META_CONFIG, "config-user": user,
             "fstab": "# LXC_NAME fstab (LXC_ROOTFS)\n",
             "expiry": "%d\n" % expiry, "create-message": CREATE_MESSAGE,
             "excludes-user": EXCLUDES_USER, "templates": "/etc/hostname\n"}
    for n in range(1, 5):  # older compat levels: harmless, never the relevant copy
        files["config.%d" % n] = "# compat level %d\n%s" % (n, META_CONFIG)
        files["config-user.%d" % n] = "# compat level %d\n%s" % (n, user)
    return files


def build_meta(dest_tar: Path, workdir: Path, expiry: Optional[int] = None,
               meta: Optional[Dict[str, Optional[str]]] = None) -> Path:
    """meta.tar.xz; `meta` adds or replaces files, and a None value omits that file."""
    files = default_meta_files(expiry)
    files.update(meta or {})
    d = Path(workdir)
    d.mkdir(parents=True)
    for name, text in files.items():
        if text is not None:
            _write(d, name, text)
    _set_mtimes(d, {})
    return pack_tar_xz(d, dest_tar)


@dataclass(frozen=True)
class IndexEntry:
    dist: str
    release: str
    arch: str
    variant: str
    build: str
    path: str  # relative to the server base (prefix included), with a trailing /

    def line(self) -> str:
        return ";".join((self.dist, self.release, self.arch, self.variant, self.build,
                         self.path))

    @property
    def key(self) -> str:
        return "/".join((self.dist, self.release, self.arch, self.variant, self.build))


@dataclass
class ImageSpec:
    """What to build; everything a test may want to vary."""

    dist: str
    release: str
    arch: str
    build: str
    variant: str = "default"
    tty_conf: bool = False
    extra_files: Dict[str, Union[str, bytes]] = field(default_factory=dict)
    meta: Dict[str, Optional[str]] = field(default_factory=dict)  # None: omit file
    expiry: Optional[int] = None  # default: now + 30 days
    hook: Optional[Callable[[Path], None]] = None


@dataclass
class PublishedImage:
    entry: IndexEntry
    dir: Path  # docroot directory holding rootfs.tar.xz, meta.tar.xz and .asc files
    tree: Path  # the source tree, to compare unpacked rootfs against
    meta: Dict[str, Optional[str]]

    @property
    def rootfs_tar(self) -> Path:
        return self.dir / "rootfs.tar.xz"

    @property
    def meta_tar(self) -> Path:
        return self.dir / "meta.tar.xz"


def publish_image(docroot: Path, spec: ImageSpec, keys: Optional[GpgKeys],
                  workdir: Path, sign: Optional[str] = "test",
                  prefix: str = "") -> PublishedImage:
    """Build an image and put it in the server layout under docroot/prefix, signed with
    `sign` ('test', 'foreign' or None for no .asc). The index path excludes the prefix
    (as mirrors' indexes do)."""
    rel = "images/%s/%s/%s/%s/%s" % (spec.dist, spec.release, spec.arch, spec.variant,
                                    spec.build)
    out = Path(docroot) / prefix.strip("/") / rel
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="img-", dir=str(workdir)))
    tree = build_rootfs(work / "rootfs", spec.build, spec.tty_conf, spec.extra_files,
                        spec.hook)
    pack_tar_xz(tree, out / "rootfs.tar.xz")
    build_meta(out / "meta.tar.xz", work / "meta", spec.expiry, spec.meta)
    if sign is not None:
        assert keys is not None
        for name in ("rootfs.tar.xz", "meta.tar.xz"):
            keys.sign(out / name, sign)
    entry = IndexEntry(spec.dist, spec.release, spec.arch, spec.variant, spec.build,
                       "/%s/" % rel)
    return PublishedImage(entry, out, tree, dict(spec.meta))


def write_index(docroot: Path, mode: str, lines: Sequence[Union[IndexEntry, str]],
                compat: bool = True, keys: Optional[GpgKeys] = None,
                sign: Optional[str] = "test", prefix: str = "") -> Path:
    """Write meta/1.0/index-<mode>.7 (compat) or index-<mode> under docroot/prefix.
    `lines` mixes entries and raw strings (blank or malformed lines on purpose)."""
    d = Path(docroot) / prefix.strip("/") / "meta/1.0"
    d.mkdir(parents=True, exist_ok=True)
    path = d / ("index-%s%s" % (mode, ".7" if compat else ""))
    path.write_text("".join((x.line() if isinstance(x, IndexEntry) else x) + "\n"
                            for x in lines))
    if sign is not None:
        assert keys is not None
        keys.sign(path, sign)
    return path


# ---------------------------------------------------------------------------
# The session catalog
# ---------------------------------------------------------------------------

MIRROR_PREFIX = "/mirror"
MALFORMED_LINE = "broken;line;without;enough-fields"
CATALOG_SPECS = (
    ImageSpec("testos", "stable", "amd64", "20261101_00:00"),  # oldest first
    ImageSpec("testos", "stable", "amd64", "20261127_05:24"),
    ImageSpec("testos", "stable", "amd64", "20261127_05:24", variant="cloud"),
    ImageSpec("otheros", "1.0", "arm64", "20261120_00:00"),
    ImageSpec("single", "one", "amd64", "20261127_00:00"),  # one build: shell-comparable
)


@dataclass
class Catalog:
    """The session's server content. Root: index-<mode>.7 lists every image (plus a
    blank and a malformed line); plain index-<mode> lacks the cloud variant. Mirror
    (MIRROR_PREFIX): only plain index-<mode>, listing every image."""

    docroot: Path
    images: Dict[str, PublishedImage]  # IndexEntry.key -> image

    def image(self, dist: str, release: str = "", arch: str = "", variant: str = "default",
              build: Optional[str] = None) -> PublishedImage:
        """An image by name; without `build`, the newest one."""
        found = [i for i in self.images.values() if i.entry.dist == dist and
                 (not release or i.entry.release == release) and
                 (not arch or i.entry.arch == arch) and i.entry.variant == variant and
                 (build is None or i.entry.build == build)]
        if not found:
            raise KeyError((dist, release, arch, variant, build))
        return max(found, key=lambda i: i.entry.build)


def catalog_index_lines(entries: Sequence[IndexEntry]) -> List[Union[IndexEntry, str]]:
    """Entries with a blank and a malformed line in the middle (must be skipped)."""
    lines: List[Union[IndexEntry, str]] = list(entries)
    lines[2:2] = ["", MALFORMED_LINE]
    return lines


def build_catalog(root: Path, keys: GpgKeys) -> Catalog:
    """Build and sign the session catalog under root/docroot (slow-ish: once per session)."""
    docroot, work = Path(root) / "docroot", Path(root) / "work"
    work.mkdir(parents=True)
    images = {}
    for spec in CATALOG_SPECS:
        img = publish_image(docroot, spec, keys, work)
        images[img.entry.key] = img
    entries = [i.entry for i in images.values()]
    plain = [e for e in entries if e.variant != "cloud"]
    for mode in ("system", "user"):
        write_index(docroot, mode, catalog_index_lines(entries), True, keys)
        write_index(docroot, mode, catalog_index_lines(plain), False, keys)
        write_index(docroot, mode, catalog_index_lines(entries), False, keys,
                    prefix=MIRROR_PREFIX)
    shutil.copytree(str(docroot / "images"), str(docroot / MIRROR_PREFIX.strip("/") / "images"),
                    copy_function=os.link)
    return Catalog(docroot, images)


def clone_docroot(src: Path, dest: Path) -> Path:
    """A private, real copy (not hard links: in-place tampering must not leak back)."""
    shutil.copytree(str(src), str(dest), symlinks=True)
    return Path(dest)


# ---------------------------------------------------------------------------
# Running things
# ---------------------------------------------------------------------------

def make_env(base: Path, pki: Pki, keyserver: str) -> Dict[str, str]:
    """Environment for the program and the shell template: trusts the test CA, own
    cache and HOME under `base`, local keyserver, no proxies, no GNUPGHOME."""
    env = dict(os.environ)
    for var in PROXY_VARS:
        env.pop(var, None)
        env.pop(var.upper(), None)
    env.pop("GNUPGHOME", None)
    home = Path(base) / "home"
    home.mkdir(parents=True, exist_ok=True)
    env.update(SSL_CERT_FILE=str(pki.ca_cert), WGETRC=str(pki.wgetrc),
               LXC_CACHE_PATH=str(Path(base) / "cache"), HOME=str(home),
               DOWNLOAD_KEYSERVER=keyserver)
    return env


def run_cmd(cmd: Sequence[str], env: Dict[str, str], input: Optional[str] = None,
            timeout: float = 300, cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    """Run with text output; stdin is /dev/null unless `input` is given, so an
    interactive prompt meets EOF instead of hanging."""
    return subprocess.run(list(cmd), env=env, input=input, timeout=timeout,
                          stdin=None if input is not None else subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          cwd=str(cwd) if cwd else None)


@dataclass
class Container:
    """What lxc-create prepares before calling a template: path/config and rootfs/."""

    name: str
    path: Path
    rootfs: Path

    @property
    def config(self) -> Path:
        return self.path / "config"

    def shell_args(self, server: ImageServer) -> List[str]:
        """Arguments as lxc-create passes them, for the shell template (no GPG)."""
        return ["--name", self.name, "--path", str(self.path), "--rootfs", str(self.rootfs),
                "--server", server.host]

    def args(self, server: ImageServer, keys: GpgKeys) -> List[str]:
        """The same plus --keyid <test fingerprint>, for lxc_download.py."""
        return self.shell_args(server) + ["--keyid", keys.test_fpr]


# What lxc-create leaves in <path>/config before the template runs (no lxc.uts.name:
# the template adds it).
INITIAL_CONFIG = "lxc.net.0.type = empty\nlxc.rootfs.path = dir:{rootfs}\n"


def make_container(base: Path, name: str = "c1") -> Container:
    """Pre-create path/config and rootfs like lxc-create does."""
    path = Path(base) / name
    rootfs = path / "rootfs"
    rootfs.mkdir(parents=True)
    (path / "config").write_text(INITIAL_CONFIG.format(rootfs=rootfs))
    return Container(name, path, rootfs)


# ---------------------------------------------------------------------------
# Tree snapshots
# ---------------------------------------------------------------------------

_TYPES = ((stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "symlink"),
          (stat.S_ISCHR, "char"), (stat.S_ISBLK, "block"), (stat.S_ISFIFO, "fifo"),
          (stat.S_ISSOCK, "socket"))


def _xattrs(path: str) -> Dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in sorted(names)}


def tree_snapshot(root: Path, xattrs: bool = True) -> Dict[str, Dict[str, Any]]:
    """Per relative path ('.' is the root): type, mode (incl. setuid/setgid/sticky),
    uid, gid, size (files), target (symlinks), rdev (major, minor), mtime (ns), links
    (the tree's paths sharing this inode, hard links only) and xattrs."""
    root_s = str(root)
    snap: Dict[str, Dict[str, Any]] = {}
    inodes: Dict[Tuple[int, int], List[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root_s):
        names = [dirpath] + [os.path.join(dirpath, n) for n in dirnames + filenames]
        for full in names if dirpath == root_s else names[1:]:
            rel = os.path.relpath(full, root_s)
            st = os.lstat(full)
            kind = next(k for test, k in _TYPES if test(st.st_mode))
            snap[rel] = {
                "type": kind, "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid,
                "gid": st.st_gid, "size": st.st_size if kind == "file" else None,
                "target": os.readlink(full) if kind == "symlink" else None,
                "rdev": (os.major(st.st_rdev), os.minor(st.st_rdev))
                if kind in ("char", "block") else None,
                "mtime": st.st_mtime_ns, "links": None,
                "xattrs": _xattrs(full) if xattrs else None,
            }
            if kind != "dir" and st.st_nlink > 1:
                inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
    for group in inodes.values():
        for rel in group:
            snap[rel]["links"] = tuple(sorted(group))
    return snap


def diff_snapshots(a: Dict[str, Dict[str, Any]], b: Dict[str, Dict[str, Any]],
                   ignore_fields: Sequence[str] = (),
                   ignore_paths: Sequence[str] = ()) -> List[str]:
    """Human-readable differences (empty list: same). ignore_paths are fnmatch globs."""
    def skip(p: str) -> bool:
        return any(fnmatch.fnmatchcase(p, g) for g in ignore_paths)
    out = []
    for p in sorted(set(a) | set(b)):
        if skip(p):
            continue
        if p not in a or p not in b:
            out.append("%s: only in %s" % (p, "second" if p not in a else "first"))
            continue
        for k in a[p]:
            if k not in ignore_fields and a[p][k] != b[p].get(k):
                out.append("%s: %s %r != %r" % (p, k, a[p][k], b[p].get(k)))
    return out


# ---------------------------------------------------------------------------
# Processes a test run started, and hand-made tarballs
# ---------------------------------------------------------------------------

RUN_MARKER = "LXC_DOWNLOAD_TEST_RUN"  # env var every run of a test carries (see conftest)


def processes_with_marker(value: str) -> List[Tuple[int, str]]:
    """Live processes whose environment carries RUN_MARKER=value (gpg daemons included)."""
    needle = ("%s=%s" % (RUN_MARKER, value)).encode()
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open("/proc/%s/environ" % pid, "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                found.append((int(pid), f.read().replace(b"\0", b" ").decode(errors="replace")))
        except OSError:
            continue
    return found


def reap_marked(value: str) -> None:
    """Stop what a run left (a SIGKILLed run cannot stop its gpg daemons) and remove its
    lxc-gpg home."""
    for pid, cmdline in processes_with_marker(value):
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
        m = re.search(r"--homedir (/tmp/lxc-gpg\.\S+)", cmdline)
        if m:
            shutil.rmtree(m.group(1), ignore_errors=True)


def write_tar_xz(path: Path, members: Sequence[Tuple[tarfile.TarInfo, Optional[bytes]]]) -> None:
    """A hand-made (e.g. hostile) pax tarball, xz-compressed as distrobuilder does."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    with open(str(path), "wb") as out:
        subprocess.run(["xz", "--threads=0", "-c"], input=buf.getvalue(), stdout=out, check=True)
