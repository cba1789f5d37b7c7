"""The command line: SPEC §2 (options, forms, order, errors, --help, --keyid, --no-validate,
progress words, hostile dist/release/arch/variant), §6 (--list) and §7 (interactive mode).

Every test runs the real program against the session's loopback HTTPS image server."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Sequence

import pytest

from support import Catalog, Container, GpgKeys, ImageServer

NEEDS_NAME = "ERROR: Please pass the name, path, and rootfs for the container"
PROGRESS = ("Downloading the image index", "Downloading the rootfs", "Downloading the metadata",
            "The image cache is now ready", "Unpacking the rootfs")
HEADER = ["DIST", "RELEASE", "ARCH", "VARIANT", "BUILD"]
NEWEST = "20261127_05:24"

# Every option SPEC §2 lists (plus --timeout from issue 3).
HELP_OPTIONS = ("-d", "--dist", "-r", "--release", "-a", "--arch", "--variant", "--server",
                "--keyid", "--keyserver", "--pubkey", "--no-validate", "--flush-cache",
                "--force-cache", "-l", "--list", "--verbose", "-h", "--help", "--name", "--path",
                "--rootfs", "--mapped-uid", "--mapped-gid", "--timeout")


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def no_traceback(res) -> None:
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout, res.stderr


def error_lines(res) -> List[str]:
    return [ln for ln in res.stderr.splitlines() if ln.startswith("ERROR:")]


def listing(stdout: str) -> List[str]:
    """The header line and the rows after it (lines of exactly five fields)."""
    lines = stdout.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.split() == HEADER)
    return [lines[start]] + [ln for ln in lines[start + 1:] if len(ln.split()) == 5]


def rows(stdout: str) -> List[List[str]]:
    return [ln.split() for ln in listing(stdout)[1:]]


def column_starts(line: str) -> List[int]:
    return [m.start() for m in re.finditer(r"\S+", line)]


def server_args(server: ImageServer, keys: GpgKeys) -> List[str]:
    return ["--server", server.host, "--keyid", keys.test_fpr]


def built(container: Container) -> str:
    return (container.rootfs / "etc/build").read_text().strip()


def cache_is_empty(env: Dict[str, str]) -> bool:
    base = Path(env["LXC_CACHE_PATH"])
    return not base.exists() or not any(base.rglob("*"))


def catalog_rows(catalog: Catalog, **want: str) -> List[List[str]]:
    """What the compat index lists for these filters, as sorted rows."""
    out = []
    for img in catalog.images.values():
        e = img.entry
        if all(getattr(e, k) == v for k, v in want.items()):
            out.append([e.dist, e.release, e.arch, e.variant, e.build])
    return sorted(out)


# ---------------------------------------------------------------------------
# --help, usage errors
# ---------------------------------------------------------------------------

def test_help_exits_0_and_documents_every_option(run_download) -> None:
    res = run_download("--help")
    assert res.returncode == 0, res.stderr
    no_traceback(res)
    missing = [opt for opt in HELP_OPTIONS
               if not re.search(r"(?<![\w-])%s(?![\w-])" % re.escape(opt), res.stdout)]
    assert missing == [], res.stdout


def test_short_help_flag_exits_0(run_download) -> None:
    res = run_download("-h")
    assert res.returncode == 0 and "--list" in res.stdout


@pytest.mark.parametrize("drop", ["--name", "--path", "--rootfs", "all"])
def test_missing_container_arguments_is_an_error(run_download, container: Container,
                                                 image_server: ImageServer, gpg_keys: GpgKeys,
                                                 env: Dict[str, str], drop: str) -> None:
    given = {"--name": container.name, "--path": str(container.path),
             "--rootfs": str(container.rootfs)}
    args: List[str] = []
    for opt, value in given.items():
        if drop not in (opt, "all"):
            args += [opt, value]
    res = run_download(*args, "-d", "testos", "-r", "stable", "-a", "amd64",
                       *server_args(image_server, gpg_keys))
    assert res.returncode == 1
    assert error_lines(res) == [NEEDS_NAME]
    no_traceback(res)
    assert image_server.count("*/rootfs.tar.xz") == 0
    assert list(container.rootfs.iterdir()) == [] and cache_is_empty(env)


def test_unknown_option_exits_2_with_error(run_download, container_args: List[str]) -> None:
    res = run_download(*container_args, "-d", "testos", "-r", "stable", "-a", "amd64",
                       "--no-such-option")
    assert res.returncode == 2
    assert error_lines(res), res.stderr
    no_traceback(res)


def test_option_without_its_value_is_a_usage_error(run_download) -> None:
    res = run_download("--list", "--server")
    assert res.returncode == 2 and error_lines(res), res.stderr
    no_traceback(res)


def test_short_keyid_refused(run_download, image_server: ImageServer, gpg_keys: GpgKeys) -> None:
    # The test key's last 8 hex digits: the keyserver would hand it out, were it accepted.
    short = "0x" + gpg_keys.test_fpr[-8:]
    res = run_download("--list", "--server", image_server.host, "--keyid", short)
    assert res.returncode != 0
    assert error_lines(res), res.stderr
    no_traceback(res)
    assert "DIST" not in res.stdout
    assert image_server.count("/meta/1.0/*") == 0


def test_full_fingerprint_keyid_with_0x_accepted(run_download, image_server: ImageServer,
                                                 gpg_keys: GpgKeys) -> None:
    res = run_download("--list", "--server", image_server.host, "--keyid",
                       "0x" + gpg_keys.test_fpr.lower())
    assert res.returncode == 0, res.stderr
    assert listing(res.stdout)[0].split() == HEADER


# ---------------------------------------------------------------------------
# option forms and order
# ---------------------------------------------------------------------------

LIST_FORMS = {
    "long-space": ["--list", "--dist", "testos", "--release", "stable", "--arch", "amd64",
                   "--variant", "default"],
    "long-equals": ["--list", "--dist=testos", "--release=stable", "--arch=amd64",
                    "--variant=default"],
    "short": ["-l", "-d", "testos", "-r", "stable", "-a", "amd64", "--variant", "default"],
    "short-attached": ["-l", "-dtestos", "-rstable", "-aamd64", "--variant=default"],
}


@pytest.mark.parametrize("form", sorted(LIST_FORMS))
def test_option_forms_filter_the_list_alike(run_download, image_server: ImageServer,
                                            gpg_keys: GpgKeys, catalog: Catalog,
                                            form: str) -> None:
    res = run_download(*LIST_FORMS[form], "--server=" + image_server.host,
                       "--keyid=" + gpg_keys.test_fpr)
    assert res.returncode == 0, res.stderr
    expected = catalog_rows(catalog, dist="testos", release="stable", arch="amd64",
                            variant="default")
    assert len(expected) == 2  # both builds of the image: the index lists each line
    assert sorted(rows(res.stdout)) == expected


def _lxc_create_order(c: Container, server: ImageServer, keys: GpgKeys) -> List[str]:
    return ["--path=%s" % c.path, "--name=%s" % c.name, "--rootfs=%s" % c.rootfs,
            "-d", "testos", "-r", "stable", "-a", "amd64", "--server", server.host,
            "--keyid", keys.test_fpr, "--mapped-uid", "100000", "--mapped-gid", "100000"]


def _shuffled_order(c: Container, server: ImageServer, keys: GpgKeys) -> List[str]:
    return ["-a", "amd64", "--keyid=" + keys.test_fpr, "--rootfs", str(c.rootfs),
            "--release=stable", "--mapped-gid=100000", "--name", c.name, "--dist", "testos",
            "--server=" + server.host, "--path", str(c.path), "--mapped-uid=100000"]


@pytest.mark.parametrize("order", [_lxc_create_order, _shuffled_order],
                         ids=["lxc-create-order", "shuffled"])
def test_create_accepts_options_in_any_order(run_download, container: Container,
                                             image_server: ImageServer, gpg_keys: GpgKeys,
                                             order) -> None:
    res = run_download(*order(container, image_server, gpg_keys))
    assert res.returncode == 0, res.stderr
    no_traceback(res)
    assert built(container) == NEWEST
    assert (container.rootfs / "etc/hostname").read_text() == "c1\n"
    assert "lxc.uts.name = c1" in container.config.read_text()
    # --mapped-uid/gid were read as values: the container config is handed to them (§10.6)
    st = container.config.stat()
    assert (st.st_uid, st.st_gid) == (100000, 100000)


# ---------------------------------------------------------------------------
# --list (§6)
# ---------------------------------------------------------------------------

def test_list_needs_no_container_arguments_and_shows_every_variant(
        run_download, image_server: ImageServer, gpg_keys: GpgKeys, catalog: Catalog) -> None:
    res = run_download("--list", *server_args(image_server, gpg_keys))
    assert res.returncode == 0, res.stderr
    no_traceback(res)
    assert NEEDS_NAME not in res.stderr
    assert sorted(rows(res.stdout)) == catalog_rows(catalog)
    assert ["testos", "stable", "amd64", "cloud", NEWEST] in rows(res.stdout)


def test_list_columns_are_aligned(run_download, image_server: ImageServer,
                                  gpg_keys: GpgKeys) -> None:
    res = run_download("--list", *server_args(image_server, gpg_keys))
    assert res.returncode == 0, res.stderr
    lines = listing(res.stdout)
    assert lines[0].split() == HEADER
    assert len(lines) > 3
    starts = column_starts(lines[0])
    for line in lines[1:]:
        assert column_starts(line) == starts, "misaligned:\n" + "\n".join(lines)


@pytest.mark.parametrize("filters,want", [
    (["-d", "testos"], {"dist": "testos"}),
    (["-d", "testos", "--variant", "cloud"], {"dist": "testos", "variant": "cloud"}),
    (["-a", "arm64"], {"arch": "arm64"}),
    (["-r", "stable", "-a", "amd64", "--variant", "default"],
     {"release": "stable", "arch": "amd64", "variant": "default"}),
    (["-d", "single", "-r", "one"], {"dist": "single", "release": "one"}),
], ids=["dist", "dist+variant", "arch", "release+arch+variant", "dist+release"])
def test_list_filters_combine(run_download, image_server: ImageServer, gpg_keys: GpgKeys,
                              catalog: Catalog, filters: Sequence[str],
                              want: Dict[str, str]) -> None:
    res = run_download("--list", *filters, *server_args(image_server, gpg_keys))
    assert res.returncode == 0, res.stderr
    expected = catalog_rows(catalog, **want)
    assert expected
    assert sorted(rows(res.stdout)) == expected


def test_list_with_filters_matching_nothing_prints_only_the_header(
        run_download, image_server: ImageServer, gpg_keys: GpgKeys) -> None:
    res = run_download("--list", "-d", "otheros", "-a", "amd64",
                       *server_args(image_server, gpg_keys))
    assert res.returncode == 0, res.stderr
    assert listing(res.stdout)[0].split() == HEADER and rows(res.stdout) == []


# ---------------------------------------------------------------------------
# interactive mode (§7)
# ---------------------------------------------------------------------------

def test_interactive_asks_only_for_what_is_missing(run_download, container_args: List[str],
                                                   container: Container) -> None:
    # SPEC §7: a missing -d or -r means interactive mode, as in the shell template; the list
    # is shown and only the missing parts are asked for. (A missing -a alone defaults to
    # the host's architecture: issue 5, shown in test_terminal.py.)
    res = run_download(*container_args, "-d", "testos", "-a", "amd64", input="stable\n")
    assert res.returncode == 0, res.stderr
    assert "Release: " in res.stdout
    assert "Distribution: " not in res.stdout and "Architecture: " not in res.stdout
    assert listing(res.stdout)[0].split() == HEADER  # the list is shown first
    assert built(container) == NEWEST


def test_interactive_asks_for_all_three_in_order(run_download, container_args: List[str],
                                                 container: Container) -> None:
    res = run_download(*container_args, input="testos\nstable\namd64\n")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    positions = [out.find(p) for p in ("Distribution: ", "Release: ", "Architecture: ")]
    assert -1 not in positions and positions == sorted(positions), out
    assert out.find("DIST") < positions[0]
    assert built(container) == NEWEST


@pytest.mark.parametrize("answers", ["", "testos\n"], ids=["no-answer", "eof-midway"])
def test_interactive_eof_is_a_clear_error(run_download, container_args: List[str],
                                          container: Container, env: Dict[str, str],
                                          answers: str) -> None:
    res = run_download(*container_args, "-a", "amd64", input=answers)
    assert res.returncode == 1
    assert error_lines(res), res.stderr
    no_traceback(res)
    assert list(container.rootfs.iterdir()) == []
    assert not any(Path(env["LXC_CACHE_PATH"]).rglob("rootfs.tar.xz"))


def test_interactive_eof_from_dev_null(run_download, container_args: List[str]) -> None:
    res = run_download(*container_args, "-d", "testos")  # stdin is /dev/null
    assert res.returncode == 1 and error_lines(res), res.stderr
    no_traceback(res)


# ---------------------------------------------------------------------------
# --no-validate, progress words
# ---------------------------------------------------------------------------

def test_no_validate_warns_once_and_still_creates(run_download, container_args: List[str],
                                                  container: Container,
                                                  image_server: ImageServer) -> None:
    res = run_download(*container_args, "--no-validate", "-d", "testos", "-r", "stable",
                       "-a", "amd64")
    assert res.returncode == 0, res.stderr
    warnings = [ln for ln in res.stderr.splitlines() if ln.startswith("WARNING:")]
    assert len(warnings) == 1, res.stderr
    assert all(ln.startswith("WARNING:") for ln in res.stderr.splitlines() if ln.strip())
    assert built(container) == NEWEST
    assert image_server.count("/pks/lookup") == 0  # no key needed


def test_progress_lines_on_stdout_in_order(run_download, container_args: List[str],
                                           container: Container) -> None:
    res = run_download(*container_args, "-d", "single", "-r", "one", "-a", "amd64")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert [ln for ln in lines if ln in PROGRESS] == list(PROGRESS)
    for word in PROGRESS:
        assert word not in res.stderr
    assert built(container) == "20261127_00:00"


# ---------------------------------------------------------------------------
# hostile dist/release/arch/variant (§9, issue 3)
# ---------------------------------------------------------------------------

HOSTILE = [
    ("-d", "a/b"), ("-d", "../../../../tmp/evil"), ("-r", ".."), ("-r", "/"),
    ("-a", ""), ("-a", "amd64\n"), ("--variant", "de\x01fault"), ("--variant", ".."),
    ("--variant", "x/../../y"), ("-d", "test\tos"), ("-r", "stable\x7f"),
]


def assert_refused_before_anything(res, env: Dict[str, str], container: Container,
                                   image_server: ImageServer) -> None:
    """An ERROR, no traceback, and nothing cached, unpacked or downloaded."""
    assert res.returncode == 1, res.stdout + res.stderr
    assert error_lines(res), res.stderr
    no_traceback(res)
    assert cache_is_empty(env)
    assert list(container.rootfs.iterdir()) == []
    assert image_server.count("*/rootfs.tar.xz") == 0


@pytest.mark.parametrize("opt,value", HOSTILE, ids=[repr(v) for _, v in HOSTILE])
def test_hostile_image_names_rejected_before_anything_is_created(
        run_download, container: Container, image_server: ImageServer, gpg_keys: GpgKeys,
        env: Dict[str, str], tmp_path: Path, opt: str, value: str) -> None:
    args = {"-d": "testos", "-r": "stable", "-a": "amd64", "--variant": "default"}
    args[opt] = value
    flat = [x for kv in args.items() for x in kv]
    res = run_download("--name", container.name, "--path", str(container.path), "--rootfs",
                       str(container.rootfs), *flat, *server_args(image_server, gpg_keys))
    assert_refused_before_anything(res, env, container, image_server)
    assert not (tmp_path / "evil").exists() and not Path("/tmp/evil").exists()


@pytest.mark.parametrize("answer", ["../x", "a/b", ""], ids=["dotdot", "slash", "empty"])
def test_hostile_interactive_answer_rejected(run_download, container_args: List[str],
                                             container: Container, env: Dict[str, str],
                                             image_server: ImageServer, answer: str) -> None:
    # the hostile answer goes to the Release prompt; the arch answer after it is never used
    res = run_download(*container_args, "-d", "testos", input=answer + "\namd64\n")
    assert_refused_before_anything(res, env, container, image_server)
