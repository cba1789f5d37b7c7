#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""LXC container image downloader: the "download" template, in Python.

LXC runs it as a template (``lxc-create -n c1 -t download -- -d debian -r
bookworm -a amd64``); people run it by hand (``lxc_download.py --list``). It
finds the newest signed image on an image server, verifies it with gpg, keeps
it in a local cache, unpacks it into the container's rootfs and writes the
container's config. Needs Python 3.8+, and python-gnupg + gpg to validate.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import shutil
import signal
import stat
import sys
import time
from collections import OrderedDict
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Callable, Iterable, NoReturn, Dict, Iterator, List, Optional, Sequence, Tuple

if TYPE_CHECKING:  # heavy modules are imported where used, to keep --help fast
    import tarfile
    import urllib.request

VERSION = "1.0.0"
COMPAT_LEVEL = 7
DEFAULT_SERVER = "images.linuxcontainers.org"
DEFAULT_KEYID = "0xE7FB0CAEC8173D669066514CBAEFF88C22F6E216"
DEFAULT_KEYSERVER = "hkps://keyserver.ubuntu.com"
DEFAULT_TIMEOUT = 30.0
ATTEMPTS = 3
MAX_CACHE_AGE = 30 * 24 * 3600  # the design note's client-side cap on a cached build
CHUNK = 1 << 20
OPEN_DIRS = 64  # directory descriptors kept open while unpacking
GPG_WAIT = 120  # seconds gpg may take to check a signature
XZ_MEMLIMIT = "80MiB"  # xz -T0 buffers whole blocks per thread: keep the run under 100 MB

# The public key the image server signs with, used when no keyserver answers.
BUILTIN_KEY = """\
-----BEGIN PGP PUBLIC KEY BLOCK-----

mQINBFLQvwwBEADNVxfLfsKibZbF5v2Tct9N0gxdFViOzVd/IRDrJ6pTEAcMlWdS
h3VM3lV0qd1WtMlqCTgcbbk6zUAYnPQ2RsagCpOlaIZqbZ8Cv4390PuVAhG2QQvt
9YrED00unJBomsC3QuF+xg0SBpHChmFUgJxomsFuAjowdMoh8XExM2v4TEe+vm9Z
7ohBCxkw7C5cV9cQHeC1XiGBCccRe1Ib1U7+GmPUxAtGzHUsQQ4MjE/j830dmPJw
w/ZNauKyNqSzpBsMnEiX+8RwqYEeYtqBAw9pnA3BMSshfA5L5ORw3zYecowUWt+l
r5lhzBq2v3LLjzjwsb4wel8L7HZnUD+1bQe0QQkxWDKlHOIsB02DCwmz3fc9bvBI
KZwRQZ8al7HicpWc4zJPBb7U0BSHE+YwTdOffFFL7YfbRS+4yfn0JBSmtyfTPaOp
FvHV8MES52Mam3vyXWCKXC//3EXcWhhX4ZHfkcWJtEkDf1FwupptV6HEgx2d6UTZ
0vEK20Dx+Hzlg0mpR10SS/ltch8w1Zl2co467oTMspdnPosTrxG0p2G+s/gUA/+E
LY8fB/heXfNSb5IB3JJ8OTI+cwqN1Aw9X4aKPQcvPGvfQ5Mz8FZ4gkV38QzzMHsr
6eeZGUPcCctP6FVfCHO0Mzxwv2VOnTbH+k72Acni2piTwn0APd9LKilXOwARAQAB
tDpMWEMgcHJlLWJ1aWx0IGltYWdlcyA8bHhjLWRldmVsQGxpc3RzLmxpbnV4Y29u
dGFpbmVycy5vcmc+iQI4BBMBAgAiBQJS0L8MAhsDBgsJCAcDAgYVCAIJCgsEFgID
AQIeAQIXgAAKCRC67/iMIvbiFtzVD/933Dv/NsyPAiwT6BFLlqtq/Tl3NxcUogDS
Rkv1oMiIunaKZRE/pQbLJVTSbt/eC3Kz7I40juDNsFGXXhD/sQCovMc58NpTKNPR
zs3jC5vDIW721cLOhYqITvdWN+RKDCJqxBBNJztKEv29uA0PONssKBmC/apTdB6D
QLLy3ddO/LzxDrCtC8ePLGjeVoEelZHR3tg8QZE+oVBuL3ZC2NTg/XaLSDO4zGCg
Jyd1IHGKhi20Q/sBLmsFifnWt5b6ovmRqwlsZXqcS+a7Z+WSmZWT9hKIR2XSzYUW
pmlJNO4VPzHgEcaCxlw3HxQqX0Loz4R8Y91shKuJ591ZMtmyf4j6Yl9KZfLs+lZH
iX7uazhw4miXdpCvOKe8fPLa+68JGIYPxG22l2jqPJ9FIOtpSrJX3D/i8xed5h2V
Vd38fZBn+cH1Wqbw1Ni94/f66Rp5GzJyMoVO7A016Ek3wx920SmX4HkCSEel77pF
gvCBZkQDiD6TNCJxjHQpxoSGo6SDEfP0FjntB0yVy0zi+Iij9F3O1bPIIuses4OQ
FkUGJb6V0L1wXl5hOARmVtgn6klwhsLf0EsjuH9yJN2GCuaKdjAdR8J1TsjW+q4h
DKMvYOZ99YJUE+qujz9u93tJRZTuD8pQsGRez7qrZ0LUAdd/aOjNDLWzJ8AzeQE+
OKVNmCzO9A==
=euOK
-----END PGP PUBLIC KEY BLOCK-----
"""


class DownloadError(Exception):
    """A failure to report to the user as one ``ERROR:`` line."""


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived: unwind, cleaning temporary files on the way."""


@dataclass(frozen=True)
class Console:
    """Where progress, warnings and verbose lines go."""

    out: IO[str]
    verbose: bool = False
    progress: bool = False  # live progress lines, only when stderr is a terminal

    def say(self, message: str = "") -> None:
        print(message, file=self.out, flush=True)

    def warn(self, message: str) -> None:
        print(f"WARNING: {message}", file=sys.stderr, flush=True)

    def detail(self, message: str) -> None:
        if self.verbose:
            print(message, file=sys.stderr, flush=True)

    def meter(self, label: str, total: Optional[int], start: int = 0) -> "Meter":
        return Meter(label, total, start, sys.stderr if self.progress else None)


class Meter:
    """A live `label  done / total  pct  rate  ETA` line on a terminal; silent elsewhere."""

    def __init__(self, label: str, total: Optional[int], start: int, stream: Optional[IO[str]]) -> None:
        self.label, self.total, self.done, self.stream = label, total, start, stream
        self.begin, self.first, self.shown = time.monotonic(), start, 0.0

    def update(self, amount: int) -> None:
        self.done += amount
        now = time.monotonic()
        if self.stream is not None and now - self.shown >= 0.2:
            self.shown = now
            self.stream.write("\r\x1b[K" + self.line(now))
            self.stream.flush()

    def line(self, now: float) -> str:
        rate = (self.done - self.first) / max(now - self.begin, 1e-6)
        text = f"{self.label}  {human(self.done)}"
        if self.total:
            left = (self.total - self.done) / rate if rate > 0 else 0
            text += f" / {human(self.total)}  {100 * self.done // self.total:3d}%"
            text += f"  {human(rate)}/s  ETA {int(left) // 60}:{int(left) % 60:02d}"
        else:
            text += f"  {human(rate)}/s"
        return text

    def close(self) -> None:
        if self.stream is not None and self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


# ---------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors read like the rest of the program's errors."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"ERROR: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="lxc-download",
        allow_abbrev=False,
        description="LXC container image downloader: fetches a signed image from an "
        "image server, verifies it, caches it and unpacks it into a container.",
        epilog="Environment: LXC_CACHE_PATH (cache base), DOWNLOAD_KEYSERVER, "
        "http_proxy/https_proxy/no_proxy, HOME, LXC_TEMPLATE_CONFIG, LXC_HOOK_DIR.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {VERSION}")
    g = p.add_argument_group("special arguments")
    g.add_argument("-l", "--list", action="store_true", help="list the available images and exit")
    g.add_argument("--format", choices=("table", "json"), default="table",
                   help="--list output: aligned table (default) or a JSON list for scripts")
    g = p.add_argument_group("image")
    g.add_argument("-d", "--dist", help="the name of the distribution")
    g.add_argument("-r", "--release", help="release name or version")
    g.add_argument("-a", "--arch", help="architecture of the container (default: this host's)")
    g.add_argument("--variant", help='variant of the image (default: "default")')
    g.add_argument("--build", metavar="ID", help="use this exact build instead of the newest (not cached)")
    g = p.add_argument_group("optional arguments")
    g.add_argument("--server", default=DEFAULT_SERVER,
                   help=f"image server: host, host:port, host/prefix or https:// URL (default: {DEFAULT_SERVER})")
    g.add_argument("--keyid", default=None,
                   help=f"full fingerprint of the signing key (default: {DEFAULT_KEYID})")
    g.add_argument("--keyserver", default=None,
                   help=f"keyserver to fetch the key from (default: $DOWNLOAD_KEYSERVER or {DEFAULT_KEYSERVER})")
    g.add_argument("--pubkey", metavar="FILE", help="armored public key to verify with, instead of a keyserver")
    g.add_argument("--no-validate", action="store_true", help="do not verify GPG signatures (unsafe)")
    g.add_argument("--flush-cache", action="store_true", help="flush the local copy (if present)")
    g.add_argument("--force-cache", action="store_true", help="use the local copy even if expired")
    g.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help=f"network timeout for every wait (default: {DEFAULT_TIMEOUT:g})")
    g.add_argument("--verbose", action="store_true", help="show each URL fetched and each signature verified")
    g = p.add_argument_group("LXC internal arguments (set by lxc-create)")
    g.add_argument("--name", help="the container name")
    g.add_argument("--path", help="the path to the container")
    g.add_argument("--rootfs", help="the path to the container's rootfs")
    g.add_argument("--mapped-uid", type=int, default=-1, help="the container root's uid on the host (user namespaces)")
    g.add_argument("--mapped-gid", type=int, default=-1, help="the container root's gid on the host (user namespaces)")
    return p


def parse_options(argv: Sequence[str]) -> argparse.Namespace:
    opts = build_parser().parse_args(list(argv))
    if not opts.list and not (opts.name and opts.path and opts.rootfs):
        raise DownloadError("Please pass the name, path, and rootfs for the container")
    opts.keyid_given = opts.keyid is not None
    opts.keyid = normalize_keyid(opts.keyid or DEFAULT_KEYID)
    if opts.keyserver is None:
        opts.keyserver = os.environ.get("DOWNLOAD_KEYSERVER") or DEFAULT_KEYSERVER
    if opts.timeout <= 0:
        raise DownloadError("--timeout must be a positive number of seconds")
    for label in ("dist", "release", "arch", "variant"):
        value = getattr(opts, label)
        if value is not None:
            check_path_component(label, value)
    return opts


def normalize_keyid(keyid: str) -> str:
    """Only a full fingerprint names one key; short ids are trivially forged."""
    fpr = keyid[2:] if keyid.lower().startswith("0x") else keyid
    fpr = fpr.replace(" ", "").upper()
    if not re.fullmatch(r"[0-9A-F]{40}", fpr):
        raise DownloadError(f"Invalid key id '{keyid}': give the key's full 40-hex-digit fingerprint")
    return fpr


def check_path_component(label: str, value: str) -> None:
    """dist/release/arch/variant become cache directories: keep them one plain name."""
    if (not value or value in (".", "..") or "/" in value
            or any(ord(c) < 32 or ord(c) == 127 for c in value)):
        raise DownloadError(f"Invalid {label}: {value!r}")


# ---------------------------------------------------------------------------
# Mode and paths
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Mode:
    """``index`` picks the index and meta files, ``cache`` picks where the cache lives."""

    index: str
    cache: str


def detect_mode(mapped_uid: int, uid_map: str = "/proc/self/uid_map",
                init_uid_map: str = "/proc/1/uid_map") -> Mode:
    """Tell a real root (system or nested) from an unprivileged user namespace."""
    try:
        with open(uid_map) as f:
            ours = f.read()
    except FileNotFoundError:
        return Mode("system", "system")
    for line in ours.splitlines():
        fields = line.split()
        if fields == ["0", "0", "4294967295"]:
            return Mode("system", "system")
        if len(fields) == 3 and fields[1:] == ["0", "1"]:
            return Mode("user", "system")
    try:
        with open(init_uid_map) as f:
            if f.read() == ours:
                return Mode("user", "system")
    except OSError:
        pass
    if mapped_uid == -1:
        raise DownloadError("In a user namespace without a map")
    return Mode("user", "user")


def cache_base(mode: Mode) -> Path:
    override = os.environ.get("LXC_CACHE_PATH")
    if override:
        return Path(override)
    if mode.cache == "system":
        return Path("/var/cache/lxc")
    return Path(os.environ.get("HOME") or os.path.expanduser("~")) / ".cache" / "lxc"


@dataclass(frozen=True)
class Image:
    dist: str
    release: str
    arch: str
    variant: str

    def cache_dir(self, base: Path) -> Path:
        return base / "download" / self.dist / self.release / self.arch / self.variant


def relevant_file(directory: Path, name: str, mode: Mode) -> Path:
    """The mode-specific, then compat-level-specific copy of a meta file, as the shell picks it."""
    path = directory / name
    specific = directory / f"{name}-{mode.index}"
    if os.path.lexists(specific):
        path = specific
    compat = path.with_name(f"{path.name}.{COMPAT_LEVEL}")
    if os.path.lexists(compat):
        path = compat
    return path


# ---------------------------------------------------------------------------
# Server and index
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class IndexEntry:
    dist: str
    release: str
    arch: str
    variant: str
    build: str
    path: str


def server_url(server: str) -> str:
    """Accept host, host:port, host/prefix or a full URL; plain http only when spelled out."""
    from urllib.parse import urlsplit

    url = server if "://" in server else f"https://{server}"
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise DownloadError(f"Invalid server: {server}")
    return url.rstrip("/")


def parse_index(lines: Iterable[str]) -> List[IndexEntry]:
    """Keep the well-formed lines; read as a stream, since an index can be large."""
    entries = []
    for line in lines:
        fields = line.strip().split(";")
        if len(fields) != 6 or not all(fields):
            continue
        entries.append(IndexEntry(*fields))
    return entries


def select_entries(entries: Sequence[IndexEntry], dist: Optional[str] = None, release: Optional[str] = None,
                   arch: Optional[str] = None, variant: Optional[str] = None) -> List[IndexEntry]:
    wanted = {"dist": dist, "release": release, "arch": arch, "variant": variant}
    return [e for e in entries if all(v is None or getattr(e, k) == v for k, v in wanted.items())]


def find_build(entries: Sequence[IndexEntry], image: Image, build: Optional[str] = None) -> IndexEntry:
    """The pinned build, else the newest (the shell took the first line; mirrors list oldest first)."""
    matches = select_entries(entries, image.dist, image.release, image.arch, image.variant)
    if build is not None:
        pinned = [e for e in matches if e.build == build]
        if not pinned and matches:
            builds = ", ".join(sorted({e.build for e in matches}))
            raise DownloadError(f"Couldn't find build {build} of the image\nAvailable builds: {builds}")
        matches = pinned
    if not matches:
        raise DownloadError("Couldn't find a matching image" + what_is_available(entries, image))
    return max(matches, key=lambda e: e.build)


def what_is_available(entries: Sequence[IndexEntry], image: Image) -> str:
    """Name the choices at the first part of the image the user got wrong."""
    known: Dict[str, Optional[str]] = {}
    for part, label in (("dist", "distributions"), ("release", "releases"), ("arch", "architectures"),
                        ("variant", "variants")):
        pool = select_entries(entries, **known)  # type: ignore[arg-type]
        choices = sorted({getattr(e, part) for e in pool})
        if getattr(image, part) not in choices:
            where = " ".join(v for v in known.values() if v)
            return f"\nAvailable {label}{' for ' + where if where else ''}: {', '.join(choices) or 'none'}"
        known[part] = getattr(image, part)
    return ""


def image_url(base: str, entry: IndexEntry) -> str:
    """Index paths are relative to the server base; refuse any that leave it."""
    path = entry.path
    parts = [p for p in path.split("/") if p]
    if "://" in path or path.startswith("//") or not parts or any(p in (".", "..") for p in parts):
        raise DownloadError(f"Invalid image path in the index: {path}")
    return f"{base}/{'/'.join(parts)}"


class Fetcher:
    """HTTPS downloads with retries, resume, a bounded wait and no downgrade to HTTP."""

    def __init__(self, console: Console, timeout: float) -> None:
        self.console = console
        self.timeout = timeout
        self._opener: Optional[urllib.request.OpenerDirector] = None

    def opener(self) -> urllib.request.OpenerDirector:
        if self._opener is None:
            import urllib.request

            class NoDowngrade(urllib.request.HTTPRedirectHandler):
                def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
                    if req.full_url.startswith("https:") and not newurl.startswith("https:"):
                        raise DownloadError(f"Refusing redirect from {req.full_url} to {newurl}")
                    return super().redirect_request(req, fp, code, msg, headers, newurl)

            self._opener = urllib.request.build_opener(NoDowngrade())
            self._opener.addheaders = [("User-Agent", f"lxc_download.py/{VERSION} compat:{COMPAT_LEVEL}")]
        return self._opener

    def download(self, url: str, dest: Path, required: bool = True, tee: Optional[StreamCheck] = None) -> bool:
        """Stream url to dest (and to tee, on a first attempt that needs no other). A missing
        file returns False unless required."""
        import http.client
        import urllib.error

        self.console.detail(f"Fetching {url}")
        last: Optional[BaseException] = None
        for attempt in range(ATTEMPTS):
            if attempt:
                if tee is not None:
                    tee.abandon()
                    tee = None
                time.sleep(min(2 ** (attempt - 1), 4))
            try:
                self._transfer(url, dest, tee)
                return True
            except urllib.error.HTTPError as e:
                last = e
                if e.code < 500 and e.code != 429:
                    break
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                    raise
                last = e
        if not required:
            return False
        reason = getattr(last, "reason", None) or last
        raise DownloadError(f"Failed to download {url} ({reason})")

    def _transfer(self, url: str, dest: Path, tee: Optional[StreamCheck]) -> None:
        """One attempt; continues a partial dest with a Range request when the server allows."""
        import urllib.request

        have = dest.stat().st_size if dest.exists() else 0
        if have and tee is not None:  # gpg must see the file from its first byte
            tee.abandon()
            tee = None
        request = urllib.request.Request(url)
        if have:
            request.add_header("Range", f"bytes={have}-")
        with self.opener().open(request, timeout=self.timeout) as response:
            resumed = have and response.status == 206
            mode = "ab" if resumed else "wb"
            length = response.headers.get("Content-Length")
            total = int(length) + (have if resumed else 0) if length and length.isdigit() else None
            done = have if resumed else 0
            meter = self.console.meter(url.rsplit("/", 1)[-1], total, done)
            try:
                with open(dest, mode) as out:
                    while True:
                        chunk = response.read(CHUNK)
                        if not chunk:
                            break
                        out.write(chunk)
                        if tee is not None:
                            tee.feed(chunk)
                        done += len(chunk)
                        meter.update(len(chunk))
            finally:
                meter.close()
            if total is not None and done < total:
                raise OSError(errno.EPIPE, f"connection closed after {done} of {total} bytes")


# ---------------------------------------------------------------------------
# Keys and verification
# ---------------------------------------------------------------------------

class Keyring:
    """A throwaway GNUPGHOME holding only the image signing key; the user's keyring is never used."""

    def __init__(self, console: Console, opts: argparse.Namespace, fetcher: Fetcher) -> None:
        self.console = console
        self.opts = opts
        self.fetcher = fetcher
        self.home: Optional[str] = None
        self.trusted: List[str] = []
        self.gpg = None

    def __enter__(self) -> Keyring:
        try:
            import gnupg
        except ImportError:
            raise DownloadError("python-gnupg is not installed: it is needed to validate images "
                                "(install python3-gnupg, or pass --no-validate to skip validation)") from None
        if not shutil.which("gpg"):
            raise DownloadError("gpg is not installed: it is needed to validate images "
                                "(install gnupg, or pass --no-validate to skip validation)")
        import logging
        import tempfile

        logging.getLogger("gnupg").addHandler(logging.NullHandler())
        logging.getLogger("gnupg").propagate = False
        short = "/tmp" if os.access("/tmp", os.W_OK) else None  # gpg-agent socket paths are short
        self.home = tempfile.mkdtemp(prefix="lxc-gpg.", dir=short)
        try:  # a failure here must still stop the daemons and remove the home
            try:
                # public keys need no gpg-agent or dirmngr: start neither, leave none behind
                self.gpg = gnupg.GPG(gnupghome=self.home, options=["--no-autostart"])
            except (OSError, ValueError) as e:
                raise DownloadError(f"Unable to run gpg ({e}); pass --no-validate to skip validation") from None
            self.console.say("Setting up the GPG keyring")
            self._load_key()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.home:
            if any(name.startswith("S.") for name in os.listdir(self.home)) and shutil.which("gpgconf"):
                import subprocess  # a daemon started after all (its socket is here): stop it

                env = dict(os.environ, GNUPGHOME=self.home)
                subprocess.run(["gpgconf", "--kill", "all"], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, timeout=30, check=False)
            shutil.rmtree(self.home, ignore_errors=True)

    def _load_key(self) -> None:
        assert self.gpg is not None
        if self.opts.pubkey:
            try:
                data = Path(self.opts.pubkey).read_text()
            except OSError as e:
                raise DownloadError(f"Unable to read the public key {self.opts.pubkey}: {e.strerror}") from None
            found = self._import(data)
            if not found:
                raise DownloadError(f"No public key found in {self.opts.pubkey}")
            if self.opts.keyid_given:
                if self.opts.keyid not in found:
                    raise DownloadError(f"{self.opts.pubkey} does not hold the key {self.opts.keyid}")
                self.trusted = [self.opts.keyid]
            else:
                self.trusted = found
            return
        self.trusted = [self.opts.keyid]
        if self._receive():
            return
        if self.opts.keyid == normalize_keyid(DEFAULT_KEYID):
            self.console.warn(f"Unable to fetch GPG key from keyserver {self.opts.keyserver}, "
                              "using the built-in copy of the LXC image signing key")
            if self.opts.keyid in self._import(BUILTIN_KEY):
                return
        raise DownloadError("Unable to fetch GPG key from keyserver")

    def _import(self, data: str) -> List[str]:
        assert self.gpg is not None
        return [f.upper() for f in self.gpg.import_keys(data).fingerprints if f]

    def _receive(self) -> bool:
        """Ask the keyserver over HKP (no dirmngr: proxies, CA and --timeout as for the images),
        and keep only the key we asked for."""
        url = hkp_lookup_url(self.opts.keyserver, self.opts.keyid)
        if url is None:
            raise DownloadError(f"Unsupported keyserver {self.opts.keyserver}: "
                                "give an hkp://, hkps://, http:// or https:// keyserver")
        assert self.gpg is not None and self.home is not None
        self.console.detail(f"Fetching key {self.opts.keyid} from {self.opts.keyserver}")
        answer = Path(self.home, "keyserver-answer.asc")
        try:
            if not self.fetcher.download(url, answer, required=False):
                return False
        except DownloadError:  # e.g. a redirect to plain HTTP
            return False
        found = self._import(answer.read_text(errors="replace"))
        others = [f for f in found if f != self.opts.keyid]
        if others:
            self.gpg.delete_keys(others)
        return self.opts.keyid in found

    def check(self, data: Path, signature: Path) -> Optional[str]:
        """The signer's fingerprint if the signature is good and by a trusted key, else None."""
        assert self.gpg is not None
        with open(signature, "rb") as sig:
            result = self.gpg.verify_file(sig, str(data))
        signer = (result.pubkey_fingerprint or "").upper()
        signers = {signer, (result.fingerprint or "").upper()}
        return signer if result.valid and signers & set(self.trusted) else None

    def accept(self, signer: Optional[str], label: str) -> None:
        if signer is None:
            raise DownloadError(f"Invalid signature for {label}")
        self.console.detail(f"Verified {label}: good signature by {signer}")


def hkp_lookup_url(keyserver: str, fingerprint: str) -> Optional[str]:
    """The HKP lookup URL of a keyserver written as gpg takes it (hkp://, hkps://, a bare host)."""
    from urllib.parse import urlsplit

    parts = urlsplit(keyserver if "://" in keyserver else f"hkp://{keyserver}")
    schemes = {"hkp": ("http", 11371), "hkps": ("https", 443), "http": ("http", 80), "https": ("https", 443)}
    if parts.scheme not in schemes or not parts.hostname:
        return None
    scheme, port = schemes[parts.scheme]
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return (f"{scheme}://{host}:{parts.port or port}{parts.path.rstrip('/')}"
            f"/pks/lookup?op=get&options=mr&search=0x{fingerprint}")


class StreamCheck:
    """gpg checks a download's signature while it arrives, reading it from a FIFO as it is
    written to disk, so a large file is not read a second time. Anything unusual (a retry,
    gpg gone) abandons it, and the file on disk is verified the usual way instead."""

    def __init__(self, keyring: Keyring, signature: Path, fifo: Path) -> None:
        import threading

        self.signer: Optional[str] = None
        os.mkfifo(fifo, 0o600)
        self.fifo = fifo
        self.thread = threading.Thread(target=self._check, args=(keyring, signature), daemon=True)
        self.thread.start()
        self.fd: Optional[int] = None
        deadline = time.monotonic() + GPG_WAIT
        while self.fd is None and self.thread.is_alive() and time.monotonic() < deadline:  # until gpg reads
            try:
                self.fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                time.sleep(0.002)
        self.streaming = self.fd is not None
        if self.fd is not None:
            os.set_blocking(self.fd, True)
            try:  # a chunk at a time, so gpg hashes one while the next one downloads
                import fcntl

                fcntl.fcntl(self.fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), CHUNK)
            except OSError:
                pass

    def _check(self, keyring: Keyring, signature: Path) -> None:
        self.signer = keyring.check(self.fifo, signature)

    def feed(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        try:
            while view and self.fd is not None:
                view = view[os.write(self.fd, view):]
        except OSError:  # gpg stopped reading
            self.abandon()

    def abandon(self) -> None:
        self.streaming = False
        self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def finish(self) -> bool:
        """Whether gpg saw the whole file: then `signer` is its verdict."""
        self.close()
        self.thread.join(GPG_WAIT)
        self.fifo.unlink()
        if self.thread.is_alive():
            raise DownloadError(f"gpg did not answer within {GPG_WAIT} seconds")
        return self.streaming


class ImageServer:
    """The image server as this run sees it: its URL, its (verified) index, and its files."""

    def __init__(self, console: Console, opts: argparse.Namespace, mode: Mode, stack: ExitStack) -> None:
        self.console = console
        self.opts = opts
        self.base = server_url(opts.server)
        self.mode = mode
        self.stack = stack
        self.fetcher = Fetcher(console, opts.timeout)
        self._keyring: Optional[Keyring] = None
        self._index: Optional[List[IndexEntry]] = None

    def keyring(self) -> Keyring:
        """Set up on first use, so a run served from the cache needs no keyserver."""
        if self._keyring is None:
            self._keyring = self.stack.enter_context(Keyring(self.console, self.opts, self.fetcher))
        return self._keyring

    def fetch_verified(self, url: str, dest: Path, label: str, required: bool = True) -> bool:
        """Fetch a file and, when validating, its detached signature (first, so that gpg can
        check the file while it downloads); refuse it unless the signature is good."""
        if self.opts.no_validate:
            return self.fetcher.download(url, dest, required)
        keyring = self.keyring()
        signature = dest.with_name(dest.name + ".asc")
        if not self.fetcher.download(url + ".asc", signature, required):
            return False
        check = StreamCheck(keyring, signature, dest.with_name(dest.name + ".fifo"))
        try:
            if not self.fetcher.download(url, dest, required, tee=check):
                return False
        finally:
            streamed = check.finish()
        keyring.accept(check.signer if streamed else keyring.check(dest, signature), label)
        return True

    def index(self, workdir: Path) -> List[IndexEntry]:
        """The compat-level index, else the plain one; fetched and verified once per run."""
        if self._index is None:
            if not self.opts.no_validate:
                self.keyring()
            self.console.say("Downloading the image index")
            path = f"{self.base}/meta/1.0/index-{self.mode.index}"
            dest = workdir / "index"
            for url, required in ((f"{path}.{COMPAT_LEVEL}", False), (path, True)):
                for stale in (dest, dest.with_name("index.asc")):
                    if stale.exists():
                        stale.unlink()
                if self.fetch_verified(url, dest, url, required):
                    break
            with open(dest, errors="replace") as lines:
                self._index = parse_index(lines)
        return self._index


# ---------------------------------------------------------------------------
# Listing and interactive choice
# ---------------------------------------------------------------------------

def format_listing(entries: Sequence[IndexEntry]) -> str:
    rows = [("DIST", "RELEASE", "ARCH", "VARIANT", "BUILD")]
    rows += [(e.dist, e.release, e.arch, e.variant, e.build) for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(["", "---", lines[0], "---", *lines[1:], "---"])


def ask(prompt: str, console: Console) -> str:
    console.out.write(f"{prompt}: ")
    console.out.flush()
    answer = sys.stdin.readline()
    if not answer:
        raise DownloadError(f"No answer for '{prompt}': standard input is closed")
    return answer.strip()


# ---------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------

class CacheLock:
    """One creator at a time per image, so an image is downloaded once and never replaced mid-unpack."""

    def __init__(self, cache: Path, owner: Tuple[int, int]) -> None:
        self.path = cache.with_name(f".{cache.name}.lock")
        self.owner = owner
        self.fd = -1

    def __enter__(self) -> CacheLock:
        import fcntl

        make_dirs(self.path.parent, self.owner)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def make_dirs(path: Path, owner: Tuple[int, int]) -> None:
    """mkdir -p that hands each directory it makes (~/.cache too) to the mapped user, if any."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        directory.mkdir(exist_ok=True)
        if owner != (-1, -1):
            try:
                os.chown(directory, *owner)
            except OSError:
                pass


def recover_cache(cache: Path) -> None:
    """Clear what a killed run left beside the cache; put back a cache it had moved aside."""
    for leftover in sorted(cache.parent.glob(f".{cache.name}.*")):
        kind = leftover.name[len(cache.name) + 2:].split("-", 1)[0]
        if kind == "old" and not cache.exists():
            os.rename(leftover, cache)
        elif kind in ("old", "partial"):
            shutil.rmtree(leftover, ignore_errors=True)


def read_build_id(cache: Path) -> Optional[str]:
    try:
        return (cache / "build_id").read_text().strip() or None
    except OSError:
        return None


def cache_complete(cache: Path, mode: Mode) -> bool:
    return (cache / "rootfs.tar.xz").is_file() and relevant_file(cache, "config", mode).is_file()


def cache_expired(cache: Path, mode: Mode, now: Optional[float] = None) -> bool:
    """Expired by the image's own expiry, or because the build is older than the 30-day cap."""
    now = time.time() if now is None else now
    expiry = relevant_file(cache, "expiry", mode)
    if os.path.lexists(expiry):
        try:
            if int(expiry.read_text().strip()) < now:
                return True
        except (OSError, ValueError):
            return True
    try:
        return (cache / "build_id").stat().st_mtime < now - MAX_CACHE_AGE
    except OSError:
        return False


def extract_meta(meta: Path, dest: Path) -> None:
    """Meta is a flat set of small files; anything else in it is refused."""
    import tarfile

    reserved = {"rootfs.tar.xz", "rootfs.tar.xz.asc", "meta.tar.xz", "meta.tar.xz.asc", "build_id"}
    try:
        with tarfile.open(meta, "r:xz") as tar:
            for member in tar:
                name = member.name[2:] if member.name.startswith("./") else member.name
                name = name.rstrip("/")
                if member.isdir() and name in ("", "."):
                    continue
                if not member.isfile() or not re.fullmatch(r"[A-Za-z0-9_.+-]+", name) or name in reserved:
                    raise DownloadError(f"Invalid metadata tarball: unexpected member {member.name}")
                source = tar.extractfile(member)
                assert source is not None
                with open(dest / name, "wb") as out:
                    shutil.copyfileobj(source, out)
    except (tarfile.TarError, EOFError, __import__("lzma").LZMAError) as e:
        raise DownloadError(f"Invalid metadata tarball: {e}") from None


def chown_tree(root: Path, uid: int, gid: int) -> None:
    """Hand the cache to the unprivileged user who asked for it; failures don't matter."""
    def own(path: str) -> None:
        try:
            os.lchown(path, uid, gid)
        except OSError:
            pass
    own(str(root))
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            own(os.path.join(top, name))


def fetch_image(server: ImageServer, entry: IndexEntry, dest: Path) -> None:
    """Download and verify rootfs and meta into dest, and unpack the meta there."""
    url = image_url(server.base, entry)
    server.console.say("Downloading the rootfs")
    server.fetch_verified(f"{url}/rootfs.tar.xz", dest / "rootfs.tar.xz", f"{url}/rootfs.tar.xz")
    server.console.say("Downloading the metadata")
    server.fetch_verified(f"{url}/meta.tar.xz", dest / "meta.tar.xz", f"{url}/meta.tar.xz")
    extract_meta(dest / "meta.tar.xz", dest)
    (dest / "build_id").write_text(entry.build + "\n")


@contextmanager
def staging_dir(cache: Path) -> Iterator[Path]:
    """A sibling of the cache on the same filesystem, gone afterwards (or cleared by the next run)."""
    import tempfile

    staging = Path(tempfile.mkdtemp(prefix=f".{cache.name}.partial-", dir=cache.parent))
    try:
        yield staging
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def download_image(server: ImageServer, entry: IndexEntry, cache: Path) -> None:
    """The cache only ever holds a whole, verified image: build it aside, then swap it in."""
    with staging_dir(cache) as staging:
        fetch_image(server, entry, staging)
        staging.chmod(0o755)
        fsync_tree(staging)
        install_cache(staging, cache)


def fsync_tree(directory: Path) -> None:
    """Data reaches the disk before the rename makes it the cache."""
    for entry in directory.iterdir():
        fd = os.open(entry, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def install_cache(staging: Path, cache: Path) -> None:
    old = cache.with_name(f".{cache.name}.old-{os.getpid()}")
    if cache.exists():
        os.rename(cache, old)
    os.rename(staging, cache)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def cache_is_usable(cache: Path, mode: Mode, opts: argparse.Namespace, console: Console) -> bool:
    """Flush, force or expiry: whether the cached copy serves without asking the server."""
    if not cache.is_dir():
        return False
    if opts.flush_cache:
        console.say("Flushing the cache...")
        shutil.rmtree(cache)
        return False
    if not cache_complete(cache, mode):
        return False
    if opts.force_cache:
        return True
    if cache_expired(cache, mode):
        console.say("The cached copy has expired, re-downloading...")
        return False
    return True


def prepare_cache(server: ImageServer, image: Image, base: Path, opts: argparse.Namespace,
                  console: Console, workdir: Path) -> None:
    """Decide between the cache and the server, and make the cache hold the image (§9)."""
    cache, mode = image.cache_dir(base), server.mode
    if cache_is_usable(cache, mode, opts, console):
        console.say("Using image from local cache")
        return
    entry = find_build(server.index(workdir), image)
    cached = read_build_id(cache) if cache_complete(cache, mode) else None
    if cached == entry.build:
        console.say("The cache is already up to date")
        console.say("Using image from local cache")
        return
    if cached is not None and cached > entry.build:
        console.warn(f"The server offered an older build ({entry.build}) than the cached one "
                     f"({cached}); keeping the cached build")
        console.say("Using image from local cache")
        return
    download_image(server, entry, cache)
    if opts.mapped_uid >= 0 or opts.mapped_gid >= 0:
        chown_tree(base, opts.mapped_uid, opts.mapped_gid)
    console.say("The image cache is now ready")


# ---------------------------------------------------------------------------
# Unpack
# ---------------------------------------------------------------------------

def read_excludes(path: Path) -> List[str]:
    if not path.is_file():
        return []
    return [w for line in path.read_text(errors="surrogateescape").splitlines() for w in line.split()]


def excluded(name: str, patterns: Sequence[str]) -> bool:
    """tar --anchored --exclude: the pattern matches the whole name or a leading directory of it."""
    from fnmatch import fnmatchcase

    name = name.rstrip("/")
    candidates = [name]
    while "/" in name:
        name = name.rsplit("/", 1)[0]
        candidates.append(name)
    return any(fnmatchcase(c, p.rstrip("/")) for p in patterns for c in candidates)


def member_parts(name: str, member: Optional[str] = None) -> Tuple[bytes, ...]:
    """Split a member name (or a hard link's target) into safe path components, or refuse it."""
    raw = name.encode("utf-8", "surrogateescape")
    parts = tuple(p for p in raw.split(b"/") if p not in (b"", b"."))
    if raw.startswith(b"/") or b".." in parts:
        what = f"{member} -> {name}" if member else name
        raise DownloadError(f"Refusing unsafe path in the rootfs tarball: {what}")
    return parts


class RootfsWriter:
    """Creates tar members under a directory without ever following a link out of it.

    Every parent is opened component by component with O_NOFOLLOW from the rootfs
    descriptor, so a symlink in the tree (planted by the tarball or not) is never
    walked through, and every entry is created fresh rather than written into.
    """

    def __init__(self, root: Path, console: Console) -> None:
        self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.console = console
        self.dirs: OrderedDict[Tuple[bytes, ...], int] = OrderedDict({(): self.root_fd})
        self.deferred: List[Tuple[Tuple[bytes, ...], tarfile.TarInfo]] = []
        self.privileged = os.geteuid() == 0
        self.xattr_failures: List[str] = []

    def close(self) -> None:
        for fd in self.dirs.values():
            os.close(fd)
        self.dirs.clear()

    def trim(self) -> None:
        """Keep few directories open (images have more than the fd limit); never the rootfs."""
        while len(self.dirs) > OPEN_DIRS:
            oldest = next(k for k in self.dirs if k)
            os.close(self.dirs.pop(oldest))

    def dir_fd(self, parts: Tuple[bytes, ...], member: str) -> int:
        """The directory at parts, opened without following links (created if missing)."""
        fd = self.dirs.get(parts)
        if fd is not None:
            self.dirs.move_to_end(parts)
            return fd
        parent = self.dir_fd(parts[:-1], member)
        try:
            fd = os.open(parts[-1], os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        except FileNotFoundError:
            os.mkdir(parts[-1], 0o755, dir_fd=parent)
            fd = os.open(parts[-1], os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise DownloadError(f"Refusing to write through a link or non-directory "
                                    f"in the rootfs tarball: {member}") from None
            raise
        self.dirs[parts] = fd
        return fd

    def forget(self, parts: Tuple[bytes, ...]) -> None:
        """A directory is being replaced: drop what we hold of it and below it."""
        for key in [k for k in self.dirs if k[:len(parts)] == parts and k]:
            os.close(self.dirs.pop(key))
        self.deferred = [d for d in self.deferred if d[0][:len(parts)] != parts]

    def clear(self, parent: int, name: bytes, parts: Tuple[bytes, ...], keep_dir: bool) -> bool:
        """Remove what is in the way of a new entry; True if a directory to keep is there."""
        try:
            st = os.lstat(name, dir_fd=parent)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return True
            self.forget(parts)
            os.rmdir(name, dir_fd=parent)
        else:
            os.unlink(name, dir_fd=parent)
        return False

    def add(self, member: tarfile.TarInfo, write_data: Optional[Callable[[int], None]] = None) -> None:
        self.trim()  # only here: descriptors handed out below stay open for this member
        parts = member_parts(member.name)
        if not parts:
            self.deferred.append(((), member))
            return
        parent = self.dir_fd(parts[:-1], member.name)
        name = parts[-1]
        if member.isdir():
            if not self.clear(parent, name, parts, keep_dir=True):
                os.mkdir(name, 0o700, dir_fd=parent)
            self.deferred.append((parts, member))
            return
        self.clear(parent, name, parts, keep_dir=False)
        if member.islnk():
            self.link(member, parent, name)
            return
        if member.issym():
            os.symlink(member.linkname.encode("utf-8", "surrogateescape"), name, dir_fd=parent)
        elif member.isreg():
            self.write_file(member, parent, name, write_data)
            return
        elif member.ischr() or member.isblk():
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            os.mknod(name, kind | 0o600, os.makedev(member.devmajor, member.devminor), dir_fd=parent)
        elif member.isfifo():
            os.mkfifo(name, 0o600, dir_fd=parent)
        else:
            raise DownloadError(f"Unsupported member type in the rootfs tarball: {member.name}")
        self.set_owner(member, lambda u, g: os.chown(name, u, g, dir_fd=parent, follow_symlinks=False))
        if not member.issym():
            os.chmod(name, member.mode & 0o7777, dir_fd=parent)
            entry = b"/proc/self/fd/%d/%s" % (parent, name)  # setxattr has no dir_fd
            self.set_xattrs(member, lambda k, v: os.setxattr(entry, k, v, follow_symlinks=False))
        os.utime(name, ns=(mtime_ns(member),) * 2, dir_fd=parent, follow_symlinks=False)

    def link(self, member: tarfile.TarInfo, parent: int, name: bytes) -> None:
        target = member_parts(member.linkname, member.name)
        if not target:
            raise DownloadError(f"Refusing hard link to the rootfs itself: {member.name}")
        target_parent = self.dir_fd(target[:-1], member.name)
        try:
            os.link(target[-1], name, src_dir_fd=target_parent, dst_dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            raise DownloadError(f"Hard link target missing in the rootfs tarball: {member.name} -> "
                                f"{member.linkname}") from None

    def write_file(self, member: tarfile.TarInfo, parent: int, name: bytes,
                   write_data: Optional[Callable[[int], None]]) -> None:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=parent)
        try:
            if write_data is not None:
                write_data(fd)
            self.set_metadata(fd, member)
        finally:
            os.close(fd)

    def set_metadata(self, fd: int, member: tarfile.TarInfo) -> None:
        """Owner first (chown clears setuid bits and capabilities), then mode, xattrs, mtime."""
        self.set_owner(member, lambda u, g: os.fchown(fd, u, g))
        os.fchmod(fd, member.mode & 0o7777)
        self.set_xattrs(member, lambda k, v: os.setxattr(fd, k, v))
        os.utime(fd, ns=(mtime_ns(member),) * 2)

    def set_owner(self, member: tarfile.TarInfo, chown: Callable[[int, int], None]) -> None:
        if not self.privileged:
            return
        try:
            chown(member.uid, member.gid)
        except OSError as e:
            raise DownloadError(f"Unable to set owner {member.uid}:{member.gid} of {member.name}: "
                                f"{e.strerror}") from None

    def set_xattrs(self, member: tarfile.TarInfo, setxattr: Callable[[str, bytes], None]) -> None:
        for key, value in member_xattrs(member):
            try:
                setxattr(key, value)
            except OSError as e:
                self.xattr_failures.append(f"{key} on {member.name}: {e.strerror}")

    def finish(self) -> None:
        """Directory modes and times last, deepest first, so read-only directories can be filled."""
        for parts, member in reversed(self.deferred):
            self.trim()
            self.set_metadata(self.dir_fd(parts, member.name), member)
        if self.xattr_failures:
            self.console.warn(f"Could not restore {len(self.xattr_failures)} extended attribute(s), "
                              f"e.g. {self.xattr_failures[0]}")


def mtime_ns(member: tarfile.TarInfo) -> int:
    """Exact nanoseconds: GNU tar's pax `mtime` keeps a fraction a float would round."""
    text = member.pax_headers.get("mtime")
    if text and re.fullmatch(r"-?\d+(\.\d+)?", text):
        whole, _, fraction = text.partition(".")
        ns = abs(int(whole)) * 10**9 + int((fraction + "0" * 9)[:9])
        return -ns if whole.startswith("-") else ns
    return int(member.mtime) * 10**9


def member_xattrs(member: tarfile.TarInfo) -> Iterator[Tuple[str, bytes]]:
    """Extended attributes as GNU tar (SCHILY) or libarchive record them in pax headers."""
    import base64
    from urllib.parse import unquote

    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            yield key[len("SCHILY.xattr."):], value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            yield unquote(key[len("LIBARCHIVE.xattr."):]), base64.b64decode(value + "==")


class ForwardReader:
    """The decompressed tar stream, as tarfile's seekable mode reads it (it only seeks forward).

    tarfile's own stream mode ("r|") copies its buffer on every 512-byte header read. File
    contents skip Python altogether where the kernel can splice them from xz's pipe.
    """

    def __init__(self, raw: IO[bytes], pipe: Optional[int] = None) -> None:
        self.raw = raw
        self.pipe = pipe
        self.splice = getattr(os, "splice", None) if pipe is not None else None  # Python 3.10+
        self.pos = 0

    def read(self, size: int = -1) -> bytes:
        """Exactly size bytes unless the stream ends (a pipe hands out less at a time)."""
        if size < 0:
            data = self.raw.read()
        else:
            chunks, got = [], 0
            while got < size:
                chunk = self.raw.read(min(size - got, CHUNK))
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
            data = b"".join(chunks)
        self.pos += len(data)
        return data

    def copy_to(self, fd: int, size: int) -> None:
        """Write the next size bytes of the stream to fd."""
        left = size
        while left:
            if self.splice is not None:
                done = self.splice(self.pipe, fd, min(left, CHUNK))
            else:
                data = self.raw.read(min(left, CHUNK))
                done = len(data)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            if not done:
                raise EOFError("unexpected end of data")
            left -= done
            self.pos += done

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        target = offset + (self.pos if whence == os.SEEK_CUR else 0)
        if whence == os.SEEK_END or target < self.pos:
            raise OSError(errno.ESPIPE, "the rootfs tarball stream cannot seek backwards")
        while self.pos < target and self.read(min(CHUNK, target - self.pos)):
            pass
        return self.pos


@contextmanager
def tar_stream(tarball: Path) -> Iterator[ForwardReader]:
    """The decompressed tar stream: parallel `xz -T0` when present, the stdlib's lzma otherwise.

    The whole stream is read to its end, so the xz integrity check covers all of it.
    """
    xz = shutil.which("xz")
    if not xz:
        import lzma

        with lzma.open(tarball, "rb") as stream:
            reader = ForwardReader(stream)
            yield reader
            while reader.read(CHUNK):
                pass
        return
    import subprocess

    # Parallel over the image's xz blocks, within a memory bound (xz drops threads to keep it).
    proc = subprocess.Popen([xz, "-dc", "-T0", f"--memlimit-mt-decompress={XZ_MEMLIMIT}", "--", str(tarball)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        reader = ForwardReader(proc.stdout, pipe=proc.stdout.fileno())
        yield reader
        while reader.read(CHUNK):
            pass
    except BaseException:
        proc.kill()
        raise
    finally:
        proc.stdout.close()
        error = proc.stderr.read().decode(errors="replace").strip()
        proc.stderr.close()
        code = proc.wait()
    if code != 0:
        raise DownloadError(f"Invalid rootfs tarball: {error or 'xz failed'}")


def member_data(tar: tarfile.TarFile, stream: ForwardReader,
                member: tarfile.TarInfo) -> Optional[Callable[[int], None]]:
    """How to write a regular member's contents into a file descriptor."""
    if not member.isreg():
        return None
    if member.issparse():  # tarfile knows the holes
        source = tar.extractfile(member)
        assert source is not None
        return lambda fd: shutil.copyfileobj(source, open(fd, "wb", closefd=False, buffering=0), CHUNK)
    return lambda fd: stream.copy_to(fd, member.size)


def unpack_rootfs(tarball: Path, rootfs: Path, excludes: Sequence[str], console: Console) -> None:
    import lzma
    import tarfile

    console.say("Unpacking the rootfs")
    writer = RootfsWriter(rootfs, console)
    try:
        try:
            with tar_stream(tarball) as stream, tarfile.open(fileobj=stream, mode="r:", encoding="utf-8",
                                                             errors="surrogateescape") as tar:
                while True:
                    member = tar.next()
                    if member is None:
                        break
                    tar.members.clear()  # tarfile keeps every member it read: memory must not grow
                    if excludes and excluded(member.name, excludes):
                        continue
                    writer.add(member, member_data(tar, stream, member))
        except (tarfile.TarError, EOFError, lzma.LZMAError) as e:
            raise DownloadError(f"Invalid rootfs tarball: {e}") from None
        writer.finish()
        dev = writer.dir_fd((b"dev",), "dev")
        try:
            os.mkdir(b"pts", 0o755, dir_fd=dev)
        except FileExistsError:
            pass
    finally:
        writer.close()


# ---------------------------------------------------------------------------
# Configure
# ---------------------------------------------------------------------------

def write_config(path: Path, name: str, config_file: Path, fstab: Path) -> None:
    """Distribution config first, then the container's own lines, then its network (§10.2)."""
    config = path / "config"
    lines = config.read_text().splitlines(keepends=True) if config.exists() else []
    network = [line for line in lines if re.search(r"lxc.net.0", line)]
    rest = [line for line in lines if not re.search(r"lxc.net.0", line)]
    auto = [line for line in rest if re.search(r"lxc.", line)]
    kept = [line for line in rest if not re.search(r"lxc.", line)]
    out = kept + ["\n", "# Distribution configuration\n", config_file.read_text()]
    out += ["\n", "# Container specific configuration\n", *auto]
    if fstab.exists():
        out.append(f"lxc.mount.fstab = {path}/fstab\n")
    out.append(f"lxc.uts.name = {name}\n")
    if network:
        out += ["\n", "# Network configuration\n", *network]
    config.write_text("".join(out))


def substitutions(opts: argparse.Namespace) -> List[Tuple[bytes, bytes]]:
    values = [
        ("LXC_NAME", opts.name),
        ("LXC_PATH", opts.path),
        ("LXC_ROOTFS", opts.rootfs),
        ("LXC_TEMPLATE_CONFIG", os.environ.get("LXC_TEMPLATE_CONFIG") or "/usr/share/lxc/config"),
        ("LXC_HOOK_DIR", os.environ.get("LXC_HOOK_DIR") or "/usr/share/lxc/hooks"),
    ]
    return [(k.encode(), os.fsencode(v)) for k, v in values]


def rewrite_fd(fd: int, edit: Callable[[bytes], bytes]) -> None:
    with open(fd, "r+b", closefd=False) as f:
        data = f.read()
        new = edit(data)
        if new != data:
            f.seek(0)
            f.write(new)
            f.truncate()


def rootfs_regular_file(rootfs: Path, relative: str) -> Optional[int]:
    """An fd for a regular file inside the rootfs, reached without following any link; else None."""
    parts = [p for p in os.fsencode(relative).split(b"/") if p not in (b"", b".")]
    if not parts or b".." in parts:
        return None
    fd = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nxt
        target = os.open(parts[-1], os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=fd)
    except OSError:
        return None
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(target).st_mode):
        os.close(target)
        return None
    return target


def apply_templates(opts: argparse.Namespace, cache: Path, mode: Mode) -> None:
    """Replace the LXC_* placeholders in the config, the fstab and the image's template files."""
    subs = substitutions(opts)

    def edit(data: bytes) -> bytes:
        for key, value in subs:
            data = data.replace(key, value)
        return data

    targets: List[int] = []
    for own in (Path(opts.path) / "config", Path(opts.path) / "fstab"):
        if own.is_file():
            targets.append(os.open(own, os.O_RDWR | os.O_CLOEXEC))
    templates = relevant_file(cache, "templates", mode)
    if templates.is_file():
        for line in templates.read_text(errors="surrogateescape").splitlines():
            fd = rootfs_regular_file(Path(opts.rootfs), line.strip()) if line.strip() else None
            if fd is not None:
                targets.append(fd)
    for fd in targets:
        try:
            rewrite_fd(fd, edit)
        finally:
            os.close(fd)
    tty = rootfs_regular_file(Path(opts.rootfs), "etc/init/tty.conf")
    if tty is not None:
        try:
            rewrite_fd(tty, lambda d: re.sub(rb"(?m)^(.*?)mingetty", rb"\1mingetty --nohangup", d))
        finally:
            os.close(tty)


def configure(opts: argparse.Namespace, cache: Path, mode: Mode, console: Console) -> None:
    config_file = relevant_file(cache, "config", mode)
    fstab = relevant_file(cache, "fstab", mode)
    if not config_file.is_file():
        raise DownloadError("meta tarball is missing the configuration file")
    path = Path(opts.path)
    write_config(path, opts.name, config_file, fstab)
    if fstab.is_file():
        shutil.copyfile(fstab, path / "fstab")
    apply_templates(opts, cache, mode)
    if opts.mapped_uid >= 0 or opts.mapped_gid >= 0:
        for own in (path / "config", path / "fstab"):
            try:
                os.chown(own, opts.mapped_uid, opts.mapped_gid)
            except OSError:
                pass
    message = relevant_file(cache, "create-message", mode)
    if message.is_file():
        console.say("")
        console.say("---")
        console.out.write(message.read_text(errors="replace"))
        console.out.flush()


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def choose_image(opts: argparse.Namespace, server: ImageServer, console: Console, workdir: Path) -> Image:
    """The image named on the command line (the arch defaulting to the host's); else ask (§7)."""
    variant = opts.variant or "default"
    if opts.dist and opts.release:
        return Image(opts.dist, opts.release, opts.arch or host_arch(), variant)
    entries = server.index(workdir)
    console.say(format_listing(select_entries(entries, opts.dist, opts.release, opts.arch, opts.variant)))
    console.say("")
    known: Dict[str, str] = {}
    for part, prompt, plural in (("dist", "Distribution", "distributions"), ("release", "Release", "releases"),
                                 ("arch", "Architecture", "architectures")):
        answer = getattr(opts, part)
        if not answer:
            default = host_arch() if part == "arch" else None
            choices = sorted({getattr(e, part) for e in select_entries(entries, variant=variant, **known)})
            where = f" for {' '.join(known.values())}" if known else ""
            offer = f"Available {plural}{where}: {', '.join(choices) or 'none'}"
            console.say(offer + (f" (default: {default})" if default else ""))
            answer = ask(prompt, console) or default or ""
        check_path_component(part, answer)
        known[part] = answer
    console.say("")
    return Image(known["dist"], known["release"], known["arch"], variant)


def host_arch() -> str:
    """This machine's architecture in the image server's naming."""
    import platform

    machine = platform.machine()
    names = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "armhf", "armv8l": "armhf", "i686": "i386",
             "i586": "i386", "ppc64le": "ppc64el"}
    return names.get(machine, machine)


def run(opts: argparse.Namespace, console: Console) -> None:
    import tempfile

    mode = detect_mode(opts.mapped_uid)
    if opts.no_validate:
        console.warn("Running without gpg validation!")
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lxc-download.")))
        server = ImageServer(console, opts, mode, stack)
        if opts.list:
            entries = select_entries(server.index(workdir), opts.dist, opts.release, opts.arch, opts.variant)
            if opts.format == "json":
                import json

                print(json.dumps([asdict(e) for e in entries], indent=2))
            else:
                console.say(format_listing(entries))
            return
        image = choose_image(opts, server, console, workdir)
        base = cache_base(mode)
        cache = image.cache_dir(base)
        with CacheLock(cache, (opts.mapped_uid, opts.mapped_gid)):
            recover_cache(cache)
            if opts.build:  # a pinned build is used once and leaves the cache alone
                source = stack.enter_context(staging_dir(cache))
                fetch_image(server, find_build(server.index(workdir), image, opts.build), source)
            else:
                prepare_cache(server, image, base, opts, console, workdir)
                source = cache
            excludes = read_excludes(relevant_file(source, "excludes", mode))
            unpack_rootfs(source / "rootfs.tar.xz", Path(opts.rootfs), excludes, console)
            configure(opts, source, mode, console)


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


def main(argv: Optional[Sequence[str]] = None) -> int:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupted)
    try:
        opts = parse_options(sys.argv[1:] if argv is None else argv)
        out = sys.stderr if opts.format == "json" else sys.stdout  # stdout holds only the JSON
        console = Console(out, verbose=opts.verbose, progress=sys.stderr.isatty())
        run(opts, console)
        return 0
    except DownloadError as e:
        print(f"ERROR: {e}", file=sys.stderr)
    except Interrupted as e:
        print(f"ERROR: Interrupted by {e}, temporary files removed", file=sys.stderr)
        return 130
    except OSError as e:
        where = f": {os.fsdecode(e.filename)}" if e.filename else ""
        print(f"ERROR: {e.strerror or e}{where}", file=sys.stderr)
    except Exception as e:  # the user gets a message, never a traceback
        print(f"ERROR: Unexpected {type(e).__name__}: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
