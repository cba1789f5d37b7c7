#!/usr/bin/env python3
"""Benchmark: `lxc_download.py` against Debian's shell template
(/usr/share/lxc/templates/lxc-download), as issue 4 asks. Run by hand, as root:

    python3 tests/bench_create.py [--image-dir DIR] [--runs 3] [--disk-dir DIR]

Not a pytest module (the name starts with bench_, no test_ functions), not part of CI.

1. Builds a realistic image once and keeps it in --image-dir (default
   /var/tmp/lxc-bench-image/, reused when present): `debootstrap --variant=minbase
   bookworm` (apt cache cleaned, as distrobuilder does), or, if that fails or with
   --generated, a generated tree of ~170 MB / ~6.8k entries (mixed file sizes, dirs,
   symlinks, hard links). Packed exactly as distrobuilder packs: `tar --numeric-owner
   --xattrs --xattrs-include='*' -cf - -C tree . | xz --threads=0 -c` (multi-block xz).
2. Serves it on loopback over HTTPS with tests/support.py (test CA, signed index, signed
   rootfs/meta, HKP keyserver), so both programs fetch it as in the tests: SSL_CERT_FILE
   and DOWNLOAD_KEYSERVER for lxc_download.py, WGETRC for the shell template.
3. Measures, interleaved and alternating who goes first (ours, shell / shell, ours), the
   median of --runs runs of: fresh create (empty cache, fresh rootfs) and cached create
   (cache present, fresh rootfs) for both programs, plus the floors `tar -xJf` and
   `xz -T0 -dc | tar -x`. Once with everything on a tmpfs it mounts itself (--tmpfs-dir,
   unmounted at the end) and once on disk (a temporary dir under --disk-dir).
   TMPDIR points into the same filesystem for both programs (otherwise the shell template
   downloads into /tmp and its `mv` into the cache becomes a cross-filesystem copy).
   On disk, `sync` runs before every timed run (not timed), so one run's writeback does
   not land in the next; the timed region never includes writeback of the unpacked tree.
4. Times `lxc_download.py --help` (median of 10).
5. Checks once that the rootfs trees made by both programs are equal by
   support.tree_snapshot (xattrs and the templated files aside) and by file contents.

Peak RSS: wait4's ru_maxrss of a command covers it *and its reaped descendants*, i.e. it
is the largest single process of the tree (ours: max(python, xz, gpg); the shell: max(sh,
wget, tar, xz, ...)). Commands are launched through /usr/bin/time -f %M, which reports
exactly that: spawned straight from this harness, a child's ru_maxrss would include the
harness's own RSS (~50 MB), because exec records the old mm's high-water mark. To tell
the processes apart, a sampler reads VmHWM of every process of the tree from /proc every
20 ms (per-command peaks: a process living < 20 ms may be missed; VmHWM itself is exact).

If lxc_download.py cannot unpack the realistic image (GNU tar writes fractional mtimes
into pax headers), --whole-second-mtimes serves a copy with whole-second mtimes instead.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
import support  # noqa: E402

DIST, RELEASE, ARCH, VARIANT = "debian", "bookworm", "amd64", "default"
BUILD = "20250520_05:24"
MIRROR = "http://deb.debian.org/debian"
TARGET_RATIO = 0.8
TARGET_RSS_MB = 100
TARGET_HELP_MS = 150
SAMPLE_INTERVAL = 0.02


def log(msg: str) -> None:
    print("[bench] " + msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# The image
# ---------------------------------------------------------------------------

def unmount_under(path: Path) -> None:
    """Unmount whatever a failed debootstrap left mounted inside `path` (proc, sys...)."""
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mounts") as f:
        points = [line.split()[1].encode().decode("unicode_escape") for line in f]
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False)


def run_debootstrap(tree: Path, log_path: Path) -> bool:
    if not shutil.which("debootstrap"):
        log("installing debootstrap")
        subprocess.run(["apt-get", "install", "-y", "debootstrap"], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not shutil.which("debootstrap"):
        log("debootstrap not available")
        return False
    log("debootstrap --variant=minbase %s %s %s (log: %s)" % (RELEASE, tree, MIRROR, log_path))
    t0 = time.perf_counter()
    with open(str(log_path), "wb") as out:
        try:
            rc = subprocess.run(["debootstrap", "--variant=minbase", RELEASE, str(tree), MIRROR],
                                stdout=out, stderr=subprocess.STDOUT, timeout=1800).returncode
        except subprocess.TimeoutExpired:
            rc = -1
    unmount_under(tree)
    if rc != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-5:]
        log("debootstrap failed (rc %d): %s" % (rc, " | ".join(tail)))
        return False
    log("debootstrap done in %.0f s" % (time.perf_counter() - t0))
    # what distrobuilder's cleanup does: no downloaded .debs in the image
    for deb in (tree / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    for name in ("pkgcache.bin", "srcpkgcache.bin"):
        p = tree / "var/cache/apt" / name
        if p.exists():
            p.unlink()
    return True


def _content(rng: random.Random, size: int, tables: Sequence[bytes]) -> bytes:
    """Data that compresses roughly like a distro: mostly low-entropy, some random."""
    parts = []
    left = size
    while left > 0:
        n = min(left, rng.choice((4096, 16384, 65536)))
        raw = rng.getrandbits(8 * n).to_bytes(n, "little")
        kind = rng.random()
        if kind < 0.65:
            parts.append(raw.translate(tables[0]))  # binary-ish: mostly zeros
        elif kind < 0.97:
            parts.append(raw.translate(tables[1]))  # text-ish
        else:
            parts.append(raw)  # already compressed data
        left -= n
    return b"".join(parts)


def _table(weights: Dict[int, int]) -> bytes:
    out = bytearray()
    for byte, count in weights.items():
        out += bytes([byte]) * count
    assert len(out) <= 256
    out += bytes([max(weights, key=lambda k: weights[k])]) * (256 - len(out))
    return bytes(out)


def generate_tree(root: Path) -> None:
    """~170 MB, ~6.8k entries: ~700 dirs, ~5350 files (many small, a few MB-sized),
    ~700 symlinks, ~60 hard links; deterministic."""
    rng = random.Random(4)
    # xz: binary-ish ~13 %, text-ish ~52 %, random 100 %; mixed ~28 % (debootstrap's: ~24 %)
    binary = _table({0: 220, 0xFF: 12, 1: 8, 0x48: 6, 0x89: 4, 0x8B: 3, 0xE8: 3})
    text = _table({ord(c): w for c, w in zip(" etaoinshrdlc\nu-m.=f/", (30, 24, 20, 18, 16, 15, 15, 14, 13, 12,
                                                                       9, 9, 8, 7, 6, 6, 5, 4, 4, 3))})
    tables = (binary, text)
    root.mkdir(parents=True)
    os.chmod(str(root), 0o755)
    dirs = ["etc", "usr", "usr/bin", "usr/sbin", "usr/lib", "usr/lib/x86_64-linux-gnu", "usr/share",
            "usr/share/doc", "usr/share/man", "usr/share/locale", "usr/include", "var", "var/lib",
            "var/lib/dpkg", "var/lib/dpkg/info", "var/cache", "var/log", "boot", "dev", "home",
            "media", "mnt", "opt", "proc", "root", "run", "srv", "sys", "tmp"]
    while len(dirs) < 700:
        parent = rng.choice(dirs[:40] if len(dirs) > 40 and rng.random() < 0.5 else dirs)
        dirs.append("%s/d%03d" % (parent, len(dirs)))
    for d in dirs:
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(str(root / "tmp"), 0o1777)
    for name in ("bin", "sbin", "lib", "lib64"):
        os.symlink("usr/" + name if name != "lib64" else "usr/lib", str(root / name))
    files: List[str] = []
    total = 0
    for i in range(5350):
        size = min(int(rng.lognormvariate(7.7, 1.7)), 1 << 20)
        d = rng.choice(dirs)
        rel = "%s/f%04d%s" % (d, i, rng.choice(("", ".so", ".gz", ".py", ".txt", ".conf", ".pm", ".list")))
        files.append(rel)
        (root / rel).write_bytes(_content(rng, size, tables))
        os.chmod(str(root / rel), 0o755 if d.startswith("usr/bin") or d.startswith("usr/sbin") else 0o644)
        total += size
    big = 0
    while total < 170 * 10 ** 6:
        size = min(rng.randint(1 << 20, 6 << 20), 170 * 10 ** 6 - total)
        rel = "usr/lib/x86_64-linux-gnu/libbig%02d.so.%d" % (big, rng.randint(1, 9))
        (root / rel).write_bytes(_content(rng, size, tables))
        files.append(rel)
        total += size
        big += 1
    for i in range(700):
        target = rng.choice(files)
        d = rng.choice(dirs)
        link = root / d / ("l%04d" % i)
        os.symlink(os.path.relpath(str(root / target), str(root / d)), str(link))
    for i in range(60):
        target = rng.choice(files)
        os.link(str(root / target), str(root / (target + ".hl%d" % i)))


def tree_stats(root: Path) -> Tuple[int, int]:
    """(entries excluding the root, bytes of regular files with hard links counted once)."""
    entries, size, seen = 0, 0, set()
    for dirpath, dirnames, filenames in os.walk(str(root)):
        for name in dirnames + filenames:
            entries += 1
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_mode & 0o170000) == 0o100000 and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                size += st.st_size
    return entries, size


def xz_blocks(path: Path) -> int:
    out = subprocess.run(["xz", "--robot", "--list", str(path)], stdout=subprocess.PIPE,
                         text=True, check=True).stdout
    for line in out.splitlines():
        fields = line.split("\t")
        if fields[0] == "file":
            return int(fields[2])
    return 0


def ensure_image(image_dir: Path, generated: bool) -> Dict[str, object]:
    """rootfs.tar.xz + info.json in image_dir, built once."""
    tarball, info_path = image_dir / "rootfs.tar.xz", image_dir / "info.json"
    if tarball.is_file() and info_path.is_file():
        info = json.loads(info_path.read_text())
        log("reusing image %s (%s)" % (tarball, info["source"]))
        return info
    image_dir.mkdir(parents=True, exist_ok=True)
    tree = image_dir / "tree"
    if tree.exists():
        unmount_under(tree)
        shutil.rmtree(str(tree))
    source = None
    if not generated and run_debootstrap(tree, image_dir / "debootstrap.log"):
        source = "debootstrap --variant=minbase %s (%s)" % (RELEASE, MIRROR)
    if source is None:
        if tree.exists():
            unmount_under(tree)
            shutil.rmtree(str(tree))
        log("generating a synthetic tree")
        generate_tree(tree)
        source = "generated tree (~170 MB, ~6.8k entries)"
    entries, size = tree_stats(tree)
    log("packing %d entries, %.1f MB with tar | xz --threads=0" % (entries, size / 1e6))
    partial = image_dir / "rootfs.tar.xz.partial"
    t0 = time.perf_counter()
    support.pack_tar_xz(tree, partial)
    log("packed in %.0f s" % (time.perf_counter() - t0))
    os.replace(str(partial), str(tarball))
    info = {"source": source, "entries": entries, "bytes": size,
            "xz_bytes": tarball.stat().st_size, "xz_blocks": xz_blocks(tarball),
            "built": time.strftime("%Y-%m-%d %H:%M:%S")}
    info_path.write_text(json.dumps(info, indent=1) + "\n")
    shutil.rmtree(str(tree))
    return info


def whole_second_image(image_dir: Path) -> Path:
    """A copy of the image with every mtime truncated to whole seconds, so the pax
    headers carry no fractional `mtime` (a workaround switch, see --whole-second-mtimes)."""
    out = image_dir / "rootfs-whole-second-mtimes.tar.xz"
    if out.is_file():
        return out
    tree = image_dir / "tree-ws"
    rmtree(tree)
    tree.mkdir()
    log("deriving %s" % out)
    subprocess.run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpJf",
                    str(image_dir / "rootfs.tar.xz"), "-C", str(tree)], check=True)
    for dirpath, dirnames, filenames in os.walk(str(tree), topdown=False):
        for name in filenames + dirnames + ([] if dirpath != str(tree) else [""]):
            path = os.path.join(dirpath, name) if name else dirpath
            st = os.lstat(path)
            whole = st.st_mtime_ns // 10 ** 9 * 10 ** 9
            os.utime(path, ns=(whole, whole), follow_symlinks=False)
    partial = image_dir / "rootfs-whole-second-mtimes.tar.xz.partial"
    support.pack_tar_xz(tree, partial)
    os.replace(str(partial), str(out))
    rmtree(tree)
    return out


# ---------------------------------------------------------------------------
# Serving it
# ---------------------------------------------------------------------------

@dataclass
class Served:
    pki: support.Pki
    keys: support.GpgKeys
    server: support.ImageServer


def serve(work: Path, tarball: Path) -> Served:
    """Server layout as images.linuxcontainers.org, signed with the test key."""
    pki = support.make_pki(work / "pki")
    keys = support.make_gpg_keys(work / "gpgkeys")
    docroot = work / "docroot"
    rel = "images/%s/%s/%s/%s/%s" % (DIST, RELEASE, ARCH, VARIANT, BUILD)
    out = docroot / rel
    out.mkdir(parents=True)
    shutil.copyfile(str(tarball), str(out / "rootfs.tar.xz"))
    support.build_meta(out / "meta.tar.xz", work / "meta")  # fresh expiry (now + 30 days)
    for name in ("rootfs.tar.xz", "meta.tar.xz"):
        keys.sign(out / name)
    entry = support.IndexEntry(DIST, RELEASE, ARCH, VARIANT, BUILD, "/%s/" % rel)
    for mode in ("system", "user"):
        for compat in (True, False):
            support.write_index(docroot, mode, [entry], compat, keys)
    server = support.ImageServer(docroot, pki)
    server.add_key(keys.armored("test"), [keys.test_fpr, keys.test_subkey_fpr])
    return Served(pki, keys, server)


# ---------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------

def _children(pid: int) -> List[int]:
    out: List[int] = []
    try:
        for tid in os.listdir("/proc/%d/task" % pid):
            with open("/proc/%d/task/%s/children" % (pid, tid)) as f:
                out.extend(int(x) for x in f.read().split())
    except (OSError, ValueError):
        pass
    return out


def _status(pid: int) -> Optional[Tuple[str, int, int]]:
    """(name, VmHWM kB, VmRSS kB) or None (gone, or a zombie without memory)."""
    try:
        with open("/proc/%d/status" % pid) as f:
            text = f.read()
    except OSError:
        return None
    vals: Dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("Name", "VmHWM", "VmRSS"):
            vals[key] = value.strip()
    if "VmHWM" not in vals:
        return None
    return vals["Name"], int(vals["VmHWM"].split()[0]), int(vals.get("VmRSS", "0 kB").split()[0])


class RssSampler(threading.Thread):
    """Per-process peak VmHWM of a process tree, and the peak of its summed VmRSS.
    With `wrapper`, the root (GNU time) is left out and its child is the main process."""

    def __init__(self, pid: int, wrapper: bool) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.wrapper = wrapper
        self.main: Optional[int] = None if wrapper else pid
        self.done = threading.Event()
        self.peak: Dict[int, int] = {}
        self.names: Dict[int, str] = {}
        self.total_peak = 0

    def sample(self) -> None:
        todo, total = [self.pid], 0
        while todo:
            pid = todo.pop()
            kids = _children(pid)
            if pid == self.pid and self.wrapper:
                if self.main is None and kids:
                    self.main = kids[0]
                todo.extend(kids)
                continue
            st = _status(pid)
            if st is not None:
                name, hwm, rss = st
                self.names[pid] = name
                self.peak[pid] = max(self.peak.get(pid, 0), hwm)
                total += rss
            todo.extend(kids)
        self.total_peak = max(self.total_peak, total)

    def run(self) -> None:
        while True:
            self.sample()
            if self.done.wait(SAMPLE_INTERVAL):
                return

    def by_name(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for pid, kb in self.peak.items():
            name = self.names[pid]
            out[name] = max(out.get(name, 0), kb)
        return out


# GNU time reports wait4's ru_maxrss of the command it runs. We launch through it because
# a child spawned straight from this harness carries the harness's own RSS (~50 MB: the
# image server, ...) into its ru_maxrss: exec records the pre-exec mm's high-water mark.
GNU_TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None


@dataclass
class Sample:
    seconds: float
    maxrss_kb: int  # wait4 ru_maxrss: the largest single process of the tree
    main_kb: int = 0  # sampled VmHWM of the process we started
    procs: Dict[str, int] = field(default_factory=dict)  # sampled, per command name
    total_kb: int = 0  # sampled peak of the tree's summed RSS


def _exit_code(status: int) -> int:
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)


def measure(cmd: Sequence[str], env: Dict[str, str], cwd: Path, sample_rss: bool = True) -> Sample:
    with tempfile.TemporaryFile() as out, tempfile.NamedTemporaryFile("r") as rss_file:
        full = list(cmd) if GNU_TIME is None else [GNU_TIME, "-f", "%M", "-o", rss_file.name] + list(cmd)
        t0 = time.perf_counter()
        proc = subprocess.Popen(full, env=env, cwd=str(cwd), stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT)
        sampler = RssSampler(proc.pid, GNU_TIME is not None) if sample_rss else None
        if sampler is not None:
            sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        t1 = time.perf_counter()
        proc.returncode = _exit_code(status)  # reaped here: keep Popen from waiting again
        if sampler is not None:
            sampler.done.set()
            sampler.join()
        if proc.returncode != 0:
            out.seek(0)
            raise RuntimeError("%s exited %d:\n%s" % (" ".join(cmd), proc.returncode,
                                                     out.read().decode(errors="replace")[-3000:]))
        maxrss = usage.ru_maxrss if GNU_TIME is None else int(rss_file.read().split()[-1])
    s = Sample(t1 - t0, maxrss)
    if sampler is not None and sampler.main is not None:
        s.main_kb = sampler.peak.get(sampler.main, 0)
        s.procs = sampler.by_name()
        s.total_kb = sampler.total_peak
    return s


def rmtree(path: Path) -> None:
    if path.exists():
        shutil.rmtree(str(path))


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def sync() -> None:
    subprocess.run(["sync"], check=True)


# ---------------------------------------------------------------------------
# The scenarios
# ---------------------------------------------------------------------------

KINDS = ("ours fresh", "shell fresh", "ours cached", "shell cached", "ours fresh-unverified",
         "tar -xJf", "xz -T0 | tar -x")


@dataclass
class ScenarioResult:
    label: str
    where: Path
    samples: Dict[str, List[Sample]]
    check: Optional[List[str]] = None  # correctness check lines, when run here


def compare_trees(ours: Path, shell: Path) -> List[str]:
    """The two unpacked trees: equal by tree_snapshot (xattrs, templated files and the
    dir mtimes that templating touches aside) and by file contents."""
    templated = [t.strip().lstrip("/") for t in support.default_meta_files()["templates"].splitlines()
                 if t.strip()]
    snap_ours, snap_shell = support.tree_snapshot(ours), support.tree_snapshot(shell)
    ignore_dirs = {os.path.dirname(t) or "." for t in templated}
    diff = support.diff_snapshots(snap_ours, snap_shell, ignore_fields=("xattrs",),
                                  ignore_paths=templated)
    diff = [d for d in diff if not any(d.startswith("%s: mtime " % x) for x in ignore_dirs)]
    content = []
    for rel, meta in sorted(snap_ours.items()):
        if meta["type"] != "file" or rel in templated or rel not in snap_shell:
            continue
        hashes = []
        for root in (ours, shell):
            h = hashlib.sha256()
            with open(str(root / rel), "rb") as f:
                for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                    h.update(chunk)
            hashes.append(h.digest())
        if hashes[0] != hashes[1]:
            content.append("%s: contents differ" % rel)
    xattrs = sum(1 for v in snap_ours.values() if v["xattrs"])
    lines = ["%d entries (ours) vs %d (shell); %d regular files compared by sha256; "
             "entries with xattrs: ours %d, shell %d (the shell template drops them)"
             % (len(snap_ours), len(snap_shell), sum(1 for v in snap_ours.values() if v["type"] == "file"),
                xattrs, sum(1 for v in snap_shell.values() if v["xattrs"]))]
    problems = diff + content
    if problems:
        lines.append("MISMATCH (%d): %s" % (len(problems), "; ".join(problems[:20])))
    else:
        lines.append("OK: identical (ignoring xattrs, %s and its directory's mtime)" % ", ".join(templated))
    return lines


def run_scenario(label: str, base: Path, tarball: Path, served: Served, runs: int,
                 check: bool, disk: bool) -> ScenarioResult:
    log("scenario %s in %s" % (label, base))
    base.mkdir(parents=True, exist_ok=True)
    (base / "tmp").mkdir(exist_ok=True)
    env_ours = support.make_env(base, served.pki, served.server.keyserver_url)
    env_ours["TMPDIR"] = str(base / "tmp")
    env_shell = dict(env_ours, LXC_CACHE_PATH=str(base / "shell-cache"))
    local_tar = base / "rootfs.tar.xz"
    shutil.copyfile(str(tarball), str(local_tar))
    image = ["-d", DIST, "-r", RELEASE, "-a", ARCH]
    samples: Dict[str, List[Sample]] = {k: [] for k in KINDS}
    result = ScenarioResult(label, base, samples)

    def create(prog: str, kind: str) -> Path:
        ct_base = base / ("ct-" + prog)
        rmtree(ct_base)
        if kind.startswith("fresh"):
            rmtree(Path((env_ours if prog == "ours" else env_shell)["LXC_CACHE_PATH"]))
        ct = support.make_container(ct_base, "c1")
        if prog == "ours":
            cmd = [sys.executable, str(support.SCRIPT)] + ct.args(served.server, served.keys) + image
            if kind == "fresh-unverified":  # what the 5.x shell does: no GPG at all
                cmd.append("--no-validate")
            env = env_ours
        else:
            cmd = [str(support.SHELL_TEMPLATE)] + ct.shell_args(served.server) + image
            env = env_shell
        if disk:
            sync()
        samples["%s %s" % (prog, kind)].append(measure(cmd, env, base))
        return ct.rootfs

    def floor(kind: str) -> None:
        dest = base / "floor"
        rmtree(dest)
        dest.mkdir()
        if kind == "tar -xJf":
            cmd = ["tar", "-xJf", str(local_tar), "-C", str(dest)]
        else:
            cmd = ["sh", "-c", 'xz -T0 -dc -- "$1" | tar -xf - -C "$2"', "sh", str(local_tar), str(dest)]
        if disk:
            sync()
        samples[kind].append(measure(cmd, env_ours, base))

    for i in range(runs):
        order = ("ours", "shell") if i % 2 == 0 else ("shell", "ours")
        log("%s run %d/%d (%s first)" % (label, i + 1, runs, order[0]))
        rootfs = {prog: create(prog, "fresh") for prog in order}
        if check and i == 0:
            log("checking the two trees")
            result.check = compare_trees(rootfs["ours"], rootfs["shell"])
        for prog in order:
            create(prog, "cached")
        create("ours", "fresh-unverified")
        for kind in (("tar -xJf", "xz -T0 | tar -x") if i % 2 == 0 else ("xz -T0 | tar -x", "tar -xJf")):
            floor(kind)
    for name in ("ct-ours", "ct-shell", "floor"):
        rmtree(base / name)
    return result


def time_help(runs: int = 10) -> Tuple[float, float, List[float]]:
    """Median wall time of `lxc_download.py --help` and of a bare `python3 -c pass`."""
    env = dict(os.environ)
    helps, bare = [], []
    for _ in range(runs):
        for cmd, into in (([sys.executable, str(support.SCRIPT), "--help"], helps),
                          ([sys.executable, "-c", "pass"], bare)):
            t0 = time.perf_counter()
            subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
            into.append(time.perf_counter() - t0)
    return statistics.median(helps), statistics.median(bare), helps


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

def med(xs: List[Sample]) -> float:
    return statistics.median(s.seconds for s in xs)


def mb(kb: float) -> str:
    return "%.1f MB" % (kb / 1024.0)


def verdict(ok: bool) -> str:
    return "OK" if ok else "MISSED"


def procs_text(samples: List[Sample]) -> str:
    peaks: Dict[str, int] = {}
    for s in samples:
        for name, kb in s.procs.items():
            peaks[name] = max(peaks.get(name, 0), kb)
    top = sorted(peaks.items(), key=lambda kv: -kv[1])[:5]
    return ", ".join("%s %.1f" % (n, kb / 1024.0) for n, kb in top)


def report(info: Dict[str, object], runs: int, results: List[ScenarioResult],
           help_times: Tuple[float, float, List[float]], loads: Tuple[str, str]) -> None:
    p = print
    p("=" * 78)
    p("lxc_download.py vs %s" % support.SHELL_TEMPLATE)
    p("image : %s" % info["source"])
    p("        %d entries, %.1f MB unpacked, rootfs.tar.xz %.1f MB in %d xz blocks"
      % (info["entries"], int(info["bytes"]) / 1e6, int(info["xz_bytes"]) / 1e6, info["xz_blocks"]))
    xz_v = subprocess.run(["xz", "--version"], stdout=subprocess.PIPE, text=True).stdout.splitlines()[0]
    tar_v = subprocess.run(["tar", "--version"], stdout=subprocess.PIPE, text=True).stdout.splitlines()[0]
    p("host  : %d CPUs, %s, Python %s, %s, %s" % (os.cpu_count() or 0, platform.release(),
                                                  platform.python_version(), xz_v, tar_v))
    p("method: median of %d interleaved runs (order alternates each run); wall time around the"
      % runs)
    p("        subprocess; fresh = empty cache + empty rootfs, cached = cache kept + empty rootfs")
    p("load  : %s before, %s after (other work on the machine adds noise)" % loads)
    for r in results:
        s = r.samples
        p("")
        p("-- %s (%s) " % (r.label, r.where) + "-" * max(0, 60 - len(r.label) - len(str(r.where))))
        p("%-32s %10s %10s %11s   %s" % ("", "ours", "shell", "ours/shell", "target <= %.1f" % TARGET_RATIO))
        for kind in ("fresh", "cached"):
            o, sh = med(s["ours " + kind]), med(s["shell " + kind])
            p("%-32s %9.3fs %9.3fs %11.3f   %s" % (kind + " create", o, sh, o / sh,
                                                 verdict(o / sh <= TARGET_RATIO)))
        o, sh = med(s["ours fresh-unverified"]), med(s["shell fresh"])
        p("%-32s %9.3fs %9.3fs %11.3f   (the 5.x shell verifies nothing)"
          % ("fresh, --no-validate", o, sh, o / sh))
        p("%-32s %9.3fs" % ("floor: tar -xJf", med(s["tar -xJf"])))
        p("%-32s %9.3fs" % ("floor: xz -T0 -dc | tar -x", med(s["xz -T0 | tar -x"])))
        p("peak RSS (max over runs)         %10s %10s" % ("ours", "shell"))
        for kind in ("fresh", "cached"):
            o, sh = s["ours " + kind], s["shell " + kind]
            p("  %-30s %10s %10s" % (kind + ", largest process", mb(max(x.maxrss_kb for x in o)),
                                     mb(max(x.maxrss_kb for x in sh))))
            p("  %-30s %10s %10s" % (kind + ", main process*", mb(max(x.main_kb for x in o)),
                                     mb(max(x.main_kb for x in sh))))
            p("  %-30s %10s %10s" % (kind + ", whole tree at once*", mb(max(x.total_kb for x in o)),
                                     mb(max(x.total_kb for x in sh))))
            p("    per command* ours : %s" % procs_text(o))
            p("    per command* shell: %s" % procs_text(sh))
        p("  floors, largest process: tar -xJf %s, xz -T0 | tar %s"
          % (mb(max(x.maxrss_kb for x in s["tar -xJf"])), mb(max(x.maxrss_kb for x in s["xz -T0 | tar -x"]))))
        main_peak = max(x.main_kb for k in ("ours fresh", "ours cached") for x in s[k]) / 1024.0
        tree_peak = max(x.maxrss_kb for k in ("ours fresh", "ours cached") for x in s[k]) / 1024.0
        p("  ours <= %d MB: python process %.1f MB %s; largest process of its tree (xz included) %.1f MB %s"
          % (TARGET_RSS_MB, main_peak, verdict(main_peak <= TARGET_RSS_MB), tree_peak,
             verdict(tree_peak <= TARGET_RSS_MB)))
        if r.check is not None:
            p("correctness (run 1, fresh): " + r.check[0])
            for line in r.check[1:]:
                p("  " + line)
        p("all runs (s):")
        for kind in KINDS:
            p("  %-18s %s" % (kind, "  ".join("%.3f" % x.seconds for x in s[kind])))
    h, bare, helps = help_times
    p("")
    p("lxc_download.py --help: median %.0f ms of %d (min %.0f, max %.0f; bare python3 -c pass %.0f ms)"
      "   target < %d ms %s" % (h * 1000, len(helps), min(helps) * 1000, max(helps) * 1000, bare * 1000,
                                TARGET_HELP_MS, verdict(h * 1000 < TARGET_HELP_MS)))
    p("* sampled every %d ms from /proc (VmHWM per process, VmRSS summed over the tree);"
      % (SAMPLE_INTERVAL * 1000))
    if GNU_TIME:
        p("  'largest process' is wait4's ru_maxrss of the command (it and its reaped descendants:")
        p("  the largest single process, exact), read through /usr/bin/time -f %M, since a child")
        p("  spawned by this harness would carry the harness's own RSS into its ru_maxrss.")
    else:
        p("  'largest process' is os.wait4's ru_maxrss of the child (no /usr/bin/time: it includes")
        p("  the harness's RSS at spawn time, a floor of ~50 MB).")
    p("=" * 78)


# ---------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-dir", type=Path, default=Path("/var/tmp/lxc-bench-image"),
                    help="where the image is built once and kept (default %(default)s)")
    ap.add_argument("--runs", type=int, default=3, help="interleaved runs per scenario (default 3)")
    ap.add_argument("--disk-dir", type=Path, default=Path("/var/tmp"),
                    help="a temporary dir for the on-disk scenario is made here (default %(default)s)")
    ap.add_argument("--tmpfs-dir", type=Path, default=Path("/mnt/lxc-bench"),
                    help="mount point for the tmpfs scenario (default %(default)s)")
    ap.add_argument("--generated", action="store_true",
                    help="build the image from a generated tree instead of debootstrap")
    ap.add_argument("--only", choices=("tmpfs", "disk"), help="run one scenario only")
    ap.add_argument("--whole-second-mtimes", action="store_true",
                    help="serve a copy of the image with mtimes truncated to whole seconds "
                         "(works around programs that fail on GNU tar's fractional pax mtimes)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_create.py needs root (mknod, chown, mount)", file=sys.stderr)
        return 2
    if not support.SHELL_TEMPLATE.is_file():
        print("missing %s (apt-get install lxc)" % support.SHELL_TEMPLATE, file=sys.stderr)
        return 2
    info = ensure_image(args.image_dir, args.generated)
    tarball = args.image_dir / "rootfs.tar.xz"
    if args.whole_second_mtimes:
        tarball = whole_second_image(args.image_dir)
        info = dict(info, source="%s, mtimes truncated to whole seconds" % info["source"],
                    xz_bytes=tarball.stat().st_size, xz_blocks=xz_blocks(tarball))
    work = Path(tempfile.mkdtemp(prefix="lxc-bench-work.", dir="/var/tmp"))
    mounted = False
    disk_base: Optional[Path] = None
    served: Optional[Served] = None
    results: List[ScenarioResult] = []
    load_before = loadavg()
    try:
        served = serve(work, tarball)
        log("serving on %s" % served.server.https_url)
        if args.only in (None, "tmpfs"):
            mnt = args.tmpfs_dir
            mnt.mkdir(parents=True, exist_ok=True)
            if os.path.ismount(str(mnt)):
                raise SystemExit("%s is already a mount point: not touching it" % mnt)
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2G", "tmpfs", str(mnt)], check=True)
            mounted = True
            results.append(run_scenario("tmpfs", mnt / "run", tarball, served, args.runs, True, False))
        if args.only in (None, "disk"):
            args.disk_dir.mkdir(parents=True, exist_ok=True)
            disk_base = Path(tempfile.mkdtemp(prefix="lxc-bench-disk.", dir=str(args.disk_dir)))
            results.append(run_scenario("disk", disk_base, tarball, served, args.runs,
                                        args.only == "disk", True))
        log("timing --help")
        help_times = time_help()
    finally:
        if served is not None:
            served.server.close()
            served.keys.close()
        if mounted:
            if subprocess.run(["umount", str(args.tmpfs_dir)], check=False).returncode != 0:
                log("umount failed, detaching lazily")
                subprocess.run(["umount", "-l", str(args.tmpfs_dir)], check=False)
        if disk_base is not None:
            shutil.rmtree(str(disk_base), ignore_errors=True)
        shutil.rmtree(str(work), ignore_errors=True)
    report(info, args.runs, results, help_times, (load_before, loadavg()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
