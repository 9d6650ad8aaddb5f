"""The native kernels: compiled once per source, compiler and CPU; torch's ops without them."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import os
import pwd
import re
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from eanet.accel import fused, native
from eanet.accel.fused import double_normalize
from eanet.accel.upstream import mapped_libraries


def _clear() -> None:
    for cached in (native.library, native._setup, native.signatures):
        cached.cache_clear()


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty kernel cache and no loaded library, as in a new process (restored afterwards)."""
    monkeypatch.setenv("EANET_KERNELS", str(tmp_path / "kernels"))
    _clear()
    yield tmp_path / "kernels"
    _clear()


def test_built_once_into_the_cache(fresh):
    assert native.library("double_normalize") is not None
    (built,) = fresh.glob("double_normalize-*.so")
    assert not list(fresh.glob(".*.tmp"))  # no stray temporary file
    stamp = built.stat().st_mtime_ns
    native.library.cache_clear()
    assert native.library("double_normalize") is not None
    assert built.stat().st_mtime_ns == stamp  # loaded from the cache, not rebuilt


def test_shares_torchs_openmp_threads(fresh):
    """Built against the OpenMP runtime torch runs on: one pool of threads, not two."""
    before = mapped_libraries()
    runtime = native.openmp_runtime()
    assert runtime is None or "torch" in runtime  # not another package's libgomp
    lib = native.library("double_normalize")
    assert bool(lib.kernels_threaded()) == (runtime is not None)
    added = {p for p in mapped_libraries() - before if "gomp" in p}
    assert not added  # no second OpenMP runtime came with the kernels


def _normalize(z):
    z = z.detach().requires_grad_()
    q = double_normalize(z, token_dim=1)
    q.sum().backward()
    return q, z.grad


@pytest.mark.parametrize(
    "cc, message", [("/nonexistent/cc", "no C compiler"), ("false", "kernels are off")]
)
def test_without_a_working_compiler_torchs_ops_run(fresh, monkeypatch, caplog, cc, message):
    z = torch.randn(2, 8, 4, 4)
    monkeypatch.setenv("CC", cc)
    with caplog.at_level("WARNING", logger="eanet.accel.native"):
        q, grad = _normalize(z)
        assert not native.available("double_normalize")
        assert native.status()["on"] == []
    assert message in caplog.text and caplog.text.count("WARNING") == 1  # one for all four
    assert not list(fresh.glob("*"))  # nothing half-built left behind
    monkeypatch.setitem(native.ENABLED, "native", False)
    q_ref, grad_ref = _normalize(z)
    assert torch.equal(q, q_ref) and torch.equal(grad, grad_ref)


def test_an_unwritable_cache_turns_the_kernels_off(fresh, monkeypatch, caplog):
    blocker = fresh.parent / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("EANET_KERNELS", str(blocker / "kernels"))
    with caplog.at_level("WARNING", logger="eanet.accel.native"):
        assert native.library("double_normalize") is None
    assert "kernels are off" in caplog.text and str(blocker) in caplog.text


def test_other_devices_and_dtypes_use_torchs_ops(monkeypatch):
    from eanet.accel.ops.double_normalize import _runs_native

    assert _runs_native(torch.zeros(1, 4, 2, 2), 1)
    assert not _runs_native(torch.zeros(1, 4, 2, 2, dtype=torch.float64), 1)
    assert not _runs_native(torch.zeros(1, 4, 2, 2), 2)  # tokens not on axis 1
    assert not _runs_native(torch.zeros(4, 2, 2), 1)


def test_without_openmp_the_batch_is_split_over_python_threads(fresh, monkeypatch):
    monkeypatch.setattr(native, "openmp_runtime", lambda: None)
    assert not native.library("double_normalize").kernels_threaded()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    z = torch.randn(5, 16, 2, 8)
    q, grad = _normalize(z)
    monkeypatch.setitem(native.ENABLED, "native", False)
    q_ref, grad_ref = _normalize(z)
    torch.testing.assert_close(q, q_ref)
    torch.testing.assert_close(grad, grad_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.2, 0.5])
def test_native_dropout_keeps_each_element_with_probability_1_minus_p(dtype, p):
    from eanet.accel.fused import masked

    torch.manual_seed(0)
    n = 1 << 20
    x = (torch.rand(n) + 0.5).to(dtype).requires_grad_()  # no zeros of its own
    y = masked(x, p)
    keep = y != 0
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
    assert torch.equal(y[keep], x[keep])  # kept values untouched (no rescale)
    # no structure along the tensor: every residue mod 64 and both neighbours agree with p
    by_residue = keep.view(-1, 64).float().mean(0)
    assert (by_residue - (1 - p)).abs().max() < 6 * (p * (1 - p) / (n / 64)) ** 0.5
    both = (keep[1:] & keep[:-1]).float().mean().item()
    assert abs(both - (1 - p) ** 2) < 0.005
    g = torch.randn(n).to(dtype)
    y.backward(g)
    assert torch.equal(x.grad, torch.where(keep, g, torch.zeros_like(g)))


def test_native_dropout_draws_anew_each_call_and_follows_torchs_seed():
    from eanet.accel.fused import masked

    x = torch.ones(4096)
    torch.manual_seed(1)
    a, b = masked(x, 0.5), masked(x, 0.5)
    agree = (a == b).float().mean().item()
    assert 0.45 < agree < 0.55  # independent masks agree half the time
    torch.manual_seed(1)
    assert torch.equal(masked(x, 0.5), a)


def test_native_dropout_zeroes_dropped_nans():
    from eanet.accel.fused import masked

    torch.manual_seed(0)
    y = masked(torch.full((1000,), float("nan")), 0.5)
    assert (y == 0).any() and y.isnan().any() and ((y == 0) | y.isnan()).all()


@pytest.mark.parametrize("n", [1, 1001, 4096])
def test_native_dropout_draws_the_same_mask_for_fp32_and_bf16(n, fresh, monkeypatch):
    """Element i's draw depends on i and the seeds only (bf16 goes two elements per word):
    odd lengths, either thread split, either dtype give one mask."""
    from eanet.accel.fused import masked

    x = torch.rand(n) + 0.5
    torch.manual_seed(3)
    a = masked(x, 0.3) != 0
    torch.manual_seed(3)
    b = masked(x.bfloat16(), 0.3) != 0
    monkeypatch.setattr(native, "openmp_runtime", lambda: None)  # Python threads, 3 of them
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    native.library.cache_clear()
    torch.manual_seed(3)
    c = masked(x.bfloat16(), 0.3) != 0
    assert not native.library("dropout").kernels_threaded()
    assert torch.equal(a, b) and torch.equal(a, c)


# The cache: what is loaded runs as the user, so only the user's own checked files are.


def _built(name: str = "gelu") -> Path:
    """kernels/<name>.c compiled into the cache but not loaded: a library loaded into this
    process stays mapped, and damaging it in place would kill the tests."""
    cache = native._setup(os.environ.get("CC") or "cc", native.cache_dir())
    os.close(native._build(name, cache))  # opened and checked, not loaded
    (library,) = cache.directory.glob(f"{name}-*.so")
    return library


def _record(library: Path) -> None:
    """Write the sha256 of `library` beside it, as an attacker who can write there would."""
    digest = hashlib.sha256(library.read_bytes()).hexdigest()
    library.with_name(library.name + ".sha256").write_text(digest + "\n")


@pytest.fixture
def planted(tmp_path):
    """(a library whose loading creates `marker`, marker): what an attacker would plant."""
    marker, source = tmp_path / "planted-ran", tmp_path / "planted.c"
    source.write_text(
        "#include <stdio.h>\n"
        "__attribute__((constructor)) static void run(void) {\n"
        f'    FILE *f = fopen("{marker}", "w");\n'
        "    if (f) fclose(f);\n"
        "}\n"
    )
    library = tmp_path / "planted.so"
    subprocess.run(["cc", "-shared", "-fPIC", str(source), "-o", str(library)], check=True)
    return library, marker


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_cache_is_private_and_libraries_0755_whatever_the_umask(fresh, monkeypatch):
    kernels = fresh.parent / "new" / "kernels"
    monkeypatch.setenv("EANET_KERNELS", str(kernels))
    umask = os.umask(0)
    try:
        assert native.library("gelu") is not None
    finally:
        os.umask(umask)
    assert _mode(kernels) == 0o700 and _mode(kernels.parent) == 0o755
    (library,) = kernels.glob("gelu-*.so")
    assert _mode(library) == 0o755
    assert _mode(library.with_name(library.name + ".sha256")) == 0o644


@pytest.mark.parametrize("change", ["writable by others", "another user's"])
def test_a_cache_directory_that_is_not_the_users_alone_is_not_used(fresh, planted, caplog, change):
    target = _built()
    os.replace(planted[0], target)
    _record(target)
    if change == "writable by others":
        fresh.chmod(0o777)
    else:  # the directory and all in it
        for path in [fresh, *fresh.iterdir()]:
            os.chown(path, 12345, 12345)
    native._setup.cache_clear()  # a new process
    with caplog.at_level("WARNING", logger="eanet.accel.native"):
        assert native.library("gelu") is None
        assert native.status()["on"] == []
    assert not planted[1].exists()  # the planted library never ran
    assert caplog.text.count("WARNING") == 1
    assert f"{fresh} {'is ' if change[0] == 'w' else 'belongs to '}" in caplog.text
    assert "chmod 700" in caplog.text and "EANET_KERNELS" in caplog.text


def _damage(target: Path, planted: Path, how: str) -> None:
    if how == "truncated":  # a full disk, a crash mid-write: loading it was a 'Bus error'
        os.truncate(target, target.stat().st_size // 2)
    elif how == "replaced":  # the digest beside it no longer matches
        os.replace(planted, target)
    elif how == "without its digest":
        os.replace(planted, target)
        target.with_name(target.name + ".sha256").unlink()
    elif how == "another user's":
        os.replace(planted, target)
        _record(target)
        os.chown(target, 12345, 12345)
    elif how == "writable by others":
        os.replace(planted, target)
        _record(target)
        target.chmod(0o777)
    elif how == "a symlink":
        _record(planted)
        target.unlink()
        target.symlink_to(planted)
        target.with_name(target.name + ".sha256").write_bytes(
            planted.with_name(planted.name + ".sha256").read_bytes()
        )


@pytest.mark.parametrize(
    "how",
    [
        "truncated",
        "replaced",
        "without its digest",
        "another user's",
        "writable by others",
        "a symlink",
    ],
)
def test_a_damaged_or_foreign_library_is_rebuilt_never_loaded(fresh, planted, caplog, how):
    target = _built()
    _damage(target, planted[0], how)
    native._setup.cache_clear()  # a new process
    with caplog.at_level("WARNING", logger="eanet.accel.native"):
        assert native.library("gelu") is not None
    assert not planted[1].exists()
    assert caplog.text.count("WARNING") == 1 and "rebuilding them" in caplog.text
    assert str(target) in caplog.text
    assert not target.is_symlink() and target.stat().st_uid == os.geteuid()
    recorded = target.with_name(target.name + ".sha256").read_text().strip()
    assert hashlib.sha256(target.read_bytes()).hexdigest() == recorded
    x = torch.randn(1000)
    torch.testing.assert_close(fused.gelu_tanh(x), torch.nn.functional.gelu(x, approximate="tanh"))


def test_a_compiler_that_writes_nothing_leaves_nothing_cached(fresh, monkeypatch, caplog):
    monkeypatch.setenv("CC", "true")  # exits 0 whatever it is asked
    with caplog.at_level("WARNING", logger="eanet.accel.native"):
        assert native.library("gelu") is None
    assert "exited 0 but wrote no shared library" in caplog.text
    assert sorted(p.name.split("-")[0] for p in fresh.iterdir()) == [".lock", "gelu"]
    (marker,) = fresh.glob("gelu-*")  # what says so to later runs, no library
    assert marker.suffix == ".failed"


def test_temporary_files_of_killed_compiles_are_removed(fresh):
    fresh.mkdir(mode=0o700)
    stale = fresh / ".gelu-0123456789abcdef.so.k1ll3d.tmp"  # a compile killed by SIGKILL
    stale.write_bytes(b"half a library")
    assert native.library("gelu") is not None
    assert not stale.exists()


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def _dead(pid: int) -> bool:
    """Whether process `pid` has exited (a zombie counts: nothing reaps it in a container)."""
    for _ in range(100):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, IndexError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.02)
    return False


def test_a_hanging_compiler_is_killed_and_nothing_more_is_compiled(
    fresh, tmp_path, monkeypatch, caplog
):
    assert native.COMPILE_TIMEOUT <= 60 and native.VERSION_TIMEOUT <= 10
    calls, pids = tmp_path / "calls", tmp_path / "pids"
    hang = f'[ "$1" = --version ] && {{ echo hangcc 1; exit 0; }}\necho "$1" >> {calls}\n'
    hang += f"sleep 60 &\necho $! > {pids}\nwait\n"  # the hang in a child, as in cc1
    monkeypatch.setenv("CC", str(_script(tmp_path / "hangcc", hang)))
    monkeypatch.setattr(native, "COMPILE_TIMEOUT", 1)
    start = time.monotonic()
    with caplog.at_level("INFO", logger="eanet.accel.native"):
        assert native.library("gelu") is None
        assert native.library("dropout") is None  # no second compile, no second warning
    assert time.monotonic() - start < 10
    assert calls.read_text().splitlines() == [str(native.SOURCES / "gelu.c")]
    assert _dead(int(pids.read_text()))  # the compiler's own children are killed too
    messages = [(r.levelname, r.getMessage()) for r in caplog.records]
    (warning,) = [m for level, m in messages if level == "WARNING"]
    assert f"{os.environ['CC']} gelu.c did not finish within 1 s" in warning
    assert [m for _, m in messages if m.startswith("compiling")] == [
        f"compiling native kernels (first use) into {fresh}"
    ]
    assert not list(fresh.glob(".*.tmp"))


def test_cc_may_carry_arguments(fresh, tmp_path, monkeypatch, caplog):
    """CC="ccache gcc": a launcher and the compiler it runs, split as the shell would."""
    calls = tmp_path / "calls"
    launcher = _script(tmp_path / "launch", f'echo "$@" >> {calls}\nexec "$@"\n')
    monkeypatch.setenv("CC", f"'{launcher}' cc")
    with caplog.at_level("INFO", logger="eanet.accel.native"):
        assert native.library("gelu") is not None
        assert native.library("dropout") is not None
    lines = calls.read_text().splitlines()
    assert lines[0] == "cc --version" and len(lines) == 3
    assert lines[1].startswith(f"cc {native.SOURCES / 'gelu.c'} -O3")
    assert caplog.text.count("compiling native kernels (first use)") == 1


# The cache's hardening: what others can change on the way to it, what is loaded, the lock.


@pytest.mark.parametrize(
    "parent", ["writable by others", "another user's", "sticky but another user's"]
)
def test_a_cache_below_a_directory_others_can_change_is_not_used(
    fresh, planted, monkeypatch, caplog, parent
):
    """Whoever can write to a directory above the cache can swap the cache for their own
    between any check and any use (after the mkdir, after the digest check)."""
    shared = fresh.parent / "shared"
    shared.mkdir()
    monkeypatch.setenv("EANET_KERNELS", str(shared / "kernels"))
    target = _built()
    os.replace(planted[0], target)  # what the other user put there
    _record(target)
    shared.chmod(0o777 if parent == "writable by others" else 0o1777)
    if parent != "writable by others":
        os.chown(shared, 12345, 12345)
    native._setup.cache_clear()  # a new process
    with caplog.at_level("WARNING", logger="eanet.accel.native"):
        assert native.library("gelu") is None
    assert not planted[1].exists()
    assert caplog.text.count("WARNING") == 1
    said = "is writable by others" if parent[0] == "w" else "belongs to another user"
    assert f"{shared} {said}" in caplog.text


def test_a_private_cache_in_a_sticky_directory_of_roots_is_used(fresh, monkeypatch):
    """As in /tmp: no one else can rename a directory of this user's there."""
    sticky = fresh.parent / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    monkeypatch.setenv("EANET_KERNELS", str(sticky / "kernels"))
    assert native.library("gelu") is not None
    assert _mode(sticky / "kernels") == 0o700


@pytest.mark.parametrize("when", ["cached", "just compiled"])
def test_what_is_loaded_is_the_file_checked_whatever_is_renamed_over_it(
    fresh, planted, monkeypatch, caplog, when
):
    """The library is checked on the bytes of one open file and loaded through that file:
    a library renamed over its name after the check (the race) is never loaded."""
    if when == "cached":
        _built()
        native._setup.cache_clear()  # a new process
    load, renamed = ctypes.CDLL, []

    def rename_then_load(name, *args, **kwargs):
        if not renamed:  # the other user's rename, between the check and dlopen
            (target,) = fresh.glob("gelu-*.so")
            os.replace(planted[0], target)
            _record(target)
            renamed.append(target)
        return load(name, *args, **kwargs)

    monkeypatch.setattr(ctypes, "CDLL", rename_then_load)
    with caplog.at_level("WARNING", logger="eanet.accel.native"):
        assert native.library("gelu") is not None
    assert renamed and not planted[1].exists() and "WARNING" not in caplog.text
    x = torch.randn(1000)
    torch.testing.assert_close(fused.gelu_tanh(x), torch.nn.functional.gelu(x, approximate="tanh"))


def test_a_relative_cache_path_is_made_absolute(fresh, tmp_path, monkeypatch):
    """EANET_KERNELS=. gave dlopen a bare name, which it looked up on the library path."""
    work = tmp_path / "work"
    work.mkdir(mode=0o700)
    monkeypatch.chdir(work)
    monkeypatch.setenv("EANET_KERNELS", ".")
    assert native.cache_dir() == work
    assert native.library("gelu") is not None
    assert list(work.glob("gelu-*.so"))


def _no_passwd_entry(uid: int):
    raise KeyError(f"getpwuid(): uid not found: {uid}")


@pytest.mark.parametrize("xdg", [None, "cache"])
def test_without_a_home_directory_the_cache_is_a_private_one_in_the_temporary_directory(
    fresh, tmp_path, monkeypatch, xdg
):
    """No HOME and no passwd entry (a container's arbitrary uid): Path.home() raised."""
    monkeypatch.chdir(tmp_path)
    for name in ("EANET_KERNELS", "HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    if xdg:
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / xdg))
    monkeypatch.setattr(pwd, "getpwuid", _no_passwd_entry)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    expected = (
        tmp_path / "cache/eanet/kernels" if xdg else tmp_path / f"eanet-kernels-{os.getuid()}"
    )
    assert native.cache_dir() == expected
    assert native.library("gelu") is not None
    assert _mode(expected) == 0o700 and list(expected.glob("gelu-*.so"))


def test_without_any_cache_directory_the_kernels_are_off_with_one_line(fresh, monkeypatch, caplog):
    monkeypatch.setenv("EANET_KERNELS", "~/kernels")
    monkeypatch.delenv("HOME")
    monkeypatch.setattr(pwd, "getpwuid", _no_passwd_entry)
    with caplog.at_level("WARNING", logger="eanet.accel.native"):
        assert native.library("gelu") is None
    assert caplog.text.count("WARNING") == 1 and "EANET_KERNELS" in caplog.text


def test_only_this_codes_temporary_files_are_removed(fresh):
    """EANET_KERNELS may name a folder of the user's own: their .*.tmp files stay."""
    fresh.mkdir(mode=0o700)
    theirs = [fresh / ".notes.tmp", fresh / ".gelu.so.tmp", fresh / ".gelu-draft.so.x.tmp"]
    for path in theirs:
        path.write_text("keep me")
    (fresh / ".gelu-0123456789abcdef.so.dir.tmp").mkdir()
    stale = fresh / ".gelu-0123456789abcdef.so.sha256.Ab_12xyz.tmp"
    stale.write_text("half a digest")
    assert native.library("gelu") is not None
    assert all(path.read_text() == "keep me" for path in theirs)
    assert (fresh / ".gelu-0123456789abcdef.so.dir.tmp").is_dir() and not stale.exists()


@contextlib.contextmanager
def _held(lock: Path):
    """The cache's lock held as another process would (a flock of another open file)."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _within(seconds: float, fn):
    """fn() run in a thread; fails, rather than hangs, where it takes longer than `seconds`."""
    result = []
    thread = threading.Thread(target=lambda: result.append(fn()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still waiting after {seconds} s"
    return result[0]


def test_built_libraries_are_loaded_without_the_lock(fresh):
    _built()
    native._setup.cache_clear()  # a new process
    with _held(fresh / ".lock"):
        assert _within(20, lambda: native.library("gelu")) is not None


def test_a_lock_held_too_long_turns_the_kernels_off_with_one_line(fresh, monkeypatch, caplog):
    fresh.mkdir(mode=0o700)
    monkeypatch.setattr(native, "LOCK_TIMEOUT", 0.5, raising=False)
    start = time.monotonic()
    with _held(fresh / ".lock"), caplog.at_level("WARNING", logger="eanet.accel.native"):
        assert _within(20, lambda: native.library("gelu")) is None
        assert _within(20, lambda: native.library("dropout")) is None  # no second wait
    assert time.monotonic() - start < 5
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"held {fresh / '.lock'} for 0.5 s" in warning and "\n" not in warning
    x = torch.randn(1000)
    torch.testing.assert_close(fused.gelu_tanh(x), torch.nn.functional.gelu(x, approximate="tanh"))


def test_a_failed_compile_is_not_tried_again_until_the_compiler_changes(
    fresh, tmp_path, monkeypatch, caplog
):
    """A hanging compiler cost COMPILE_TIMEOUT per kernel in every run; now only in the first."""
    calls = tmp_path / "calls"
    broken = f'[ "$1" = --version ] && {{ echo brokencc 1; exit 0; }}\necho "$1" >> {calls}\n'
    monkeypatch.setenv("CC", str(_script(tmp_path / "brokencc", broken + "exit 1\n")))
    assert native.library("gelu") is None
    _clear()  # a new process
    caplog.clear()
    with caplog.at_level("WARNING", logger="eanet.accel.native"):
        assert native.library("gelu") is None
        assert native.library("dropout") is None
    assert len(calls.read_text().splitlines()) == 1
    (marker,) = fresh.glob("gelu-*.failed")
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "failed in an earlier run" in warning and f"delete {marker} to try again" in warning
    monkeypatch.setenv("CC", "cc")  # another compiler: tried again
    _clear()
    assert native.library("gelu") is not None


# The C interface: declared once, in the C prototypes; checked shapes before every call.

_P, _L, _I, _U, _F = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_uint32, ctypes.c_float


def test_the_ctypes_signatures_are_read_from_the_c_prototypes():
    threaded = {"kernels_threaded": ([], _I)}  # common.h's, in every library
    assert native.signatures("double_normalize") == threaded | {
        "dn_forward": ([_P, _P, _P, _P, _I, _L, _L, _L, _U, _U, _U, _L, _L], _I),
        "dn_backward": ([_P, _P, _P, _P, _P, _I, _L, _L, _L, _U, _U, _U, _L, _L], _I),
    }
    assert native.signatures("gelu") == threaded | {
        "gelu_forward": ([_P, _P, _I, _U, _U, _U, _L, _L, _L], _I),
        "gelu_backward": ([_P, _P, _P, _I, _U, _U, _U, _L, _L, _L], _I),
        "gelu_bias_forward": ([_P, _P, _P, _I, _L, _L, _L, _L], _I),
    }
    assert native.signatures("layer_norm") == threaded | {
        "ln_block_rows": ([], _I),
        "ln_forward": ([_P] * 9 + [_I, _L, _F, _U, _U, _U, _L, _L], _I),
        "ln_backward": ([_P] * 9 + [_I, _L, _L, _U, _U, _U, _L, _L], _I),
    }
    assert native.signatures("dropout") == threaded | {
        "keep_32bit": ([_P, _P, _U, _U, _U, _L, _L, _L], _I),
        "keep_16bit": ([_P, _P, _U, _U, _U, _L, _L, _L], _I),
    }
    for name in native.KERNELS:  # one op module a kernel, calling only its kernel's functions
        text = (Path(fused.__file__).parent / "ops" / f"{name}.py").read_text()
        called = set(re.findall(r"lib\.(\w+)", text)) | set(re.findall(r'_call\("(\w+)"', text))
        assert called and called <= set(native.signatures(name)), name


def test_a_prototype_without_a_ctypes_type_turns_its_kernel_off(
    fresh, tmp_path, monkeypatch, caplog
):
    sources = tmp_path / "kernels-src"
    sources.mkdir()
    shutil.copy(native.SOURCES / "common.h", sources)
    (sources / "odd.c").write_text(
        '#include "common.h"\nint odd(double x, long i0, long i1) { return 0; }\n'
    )
    monkeypatch.setattr(native, "SOURCES", sources)
    with caplog.at_level("WARNING", logger="eanet.accel.native"):
        assert native.library("odd") is None
    assert "odd.c: odd: no ctypes type for 'double x'" in caplog.text
    assert caplog.text.count("WARNING") == 1


@pytest.mark.parametrize("width", [4096, 2**24])
def test_layer_norm_of_another_width_raises_torchs_error(width):
    """The kernel read the (8,) weight 4096 wide: NaNs, and at 2^24 a segfault."""
    norm, x = torch.nn.LayerNorm(8), torch.randn(2, width)
    residual = torch.randn(2, width).bfloat16()
    with torch.autocast("cpu", torch.bfloat16):
        with pytest.raises(RuntimeError) as torchs:
            norm(x)
        with pytest.raises(RuntimeError) as ours:
            fused.layer_norm(norm, x)
        with pytest.raises(RuntimeError) as added:
            fused.add_layer_norm(norm, x, residual)
    assert str(ours.value) == str(added.value) == str(torchs.value)


_bf16, _i64 = torch.bfloat16, torch.int64
_SEEDS = torch.zeros(2, dtype=torch.int64)


def _dn_backward(ops, grad_shape: tuple, stats_shape: tuple):
    """The double normalisation's backward of (2, 4, 2, 2) logits, gradient and statistics
    shaped as given, no dropout."""
    z, stats = torch.randn(2, 4, 2, 2), torch.zeros(stats_shape)
    return ops.double_normalize_cpu_backward(torch.randn(grad_shape), z, stats, stats, _SEEDS, 0.0)


def _ln_backward(ops, grad_shape: tuple, stats_rows: int, seeds: torch.Tensor):
    """LayerNorm's backward of (3, 8) rows, gradient, statistics and seeds as given."""
    stats = torch.zeros(stats_rows), torch.ones(stats_rows)
    x, w = torch.randn(3, 8), torch.ones(8)
    return ops.layer_norm_cpu_backward(torch.randn(grad_shape), None, x, w, *stats, 0, seeds, 0.1)


_REFUSED = {
    "layer_norm: weight (4,) for rows of 8": lambda o: o.layer_norm_cpu(
        torch.randn(3, 8), torch.ones(4), torch.zeros(4), 1e-5, True
    ),
    "layer_norm: fp64 x": lambda o: o.layer_norm_cpu(
        torch.randn(3, 8).double(), torch.ones(8), torch.zeros(8), 1e-5, True
    ),
    "add_layer_norm: residual of another shape": lambda o: o.add_layer_norm_cpu(
        *(torch.randn(3, 8), torch.zeros(3, 4, dtype=_bf16), None),
        *(torch.ones(8), torch.zeros(8), 1e-5, 0.0),
    ),
    "add_layer_norm: fp32 residual": lambda o: o.add_layer_norm_cpu(
        *(torch.randn(3, 8), torch.zeros(3, 8), None, torch.ones(8), torch.zeros(8), 1e-5, 0.0),
    ),
    "add_layer_norm: dropout p = 1": lambda o: o.add_layer_norm_cpu(
        *(torch.randn(3, 8), torch.zeros(3, 8, dtype=_bf16), None),
        *(torch.ones(8), torch.zeros(8), 1e-5, 1.0),
    ),
    "add_layer_norm: a residual bias of another width": lambda o: o.add_layer_norm_cpu(
        *(torch.randn(3, 8), torch.zeros(3, 8, dtype=_bf16), torch.ones(3)),
        *(torch.ones(8), torch.zeros(8), 1e-5, 0.0),
    ),
    "layer_norm backward: gradient of another shape": lambda o: _ln_backward(o, (3, 4), 3, _SEEDS),
    "layer_norm backward: statistics of 2 rows": lambda o: _ln_backward(o, (3, 8), 2, _SEEDS),
    "layer_norm backward: 1 seed": lambda o: _ln_backward(o, (3, 8), 3, torch.zeros(1, dtype=_i64)),
    "double_normalize: 3-d logits": lambda o: o.double_normalize_cpu(
        torch.randn(2, 4, 4), _SEEDS, 0.0
    ),
    "double_normalize: fp64 logits": lambda o: o.double_normalize_cpu(
        torch.randn(2, 4, 2, 2).double(), _SEEDS, 0.0
    ),
    "double_normalize: 3 seeds": lambda o: o.double_normalize_cpu(
        torch.randn(2, 4, 2, 2), torch.zeros(3, dtype=_i64), 0.1
    ),
    "double_normalize: dropout p = 1": lambda o: o.double_normalize_cpu(
        torch.randn(2, 4, 2, 2), _SEEDS, 1.0
    ),
    "double_normalize backward: gradient of another shape": lambda o: _dn_backward(
        o, (2, 4, 2, 3), (2, 4)
    ),
    "double_normalize backward: statistics (2, 3)": lambda o: _dn_backward(o, (2, 4, 2, 2), (2, 3)),
    "gelu backward: gradient of another shape": lambda o: o.gelu_tanh_cpu_backward(
        torch.randn(5), torch.randn(6), _SEEDS, 0.0
    ),
    "gelu backward: 3 seeds": lambda o: o.gelu_tanh_cpu_backward(
        torch.randn(5), torch.randn(5), torch.zeros(3, dtype=_i64), 0.1
    ),
    "gelu: fp64": lambda o: o.gelu_tanh_cpu(torch.randn(4).double(), 0.0),
    "gelu: dropout p = 1": lambda o: o.gelu_tanh_cpu(torch.randn(4), 1.0),
    "dropout backward: 3 seeds": lambda o: o.dropout_cpu_backward(
        torch.randn(4), torch.zeros(3, dtype=_i64), 0.5
    ),
    "dropout: int32": lambda o: o.dropout_cpu(torch.zeros(4, dtype=torch.int32), 0.5),
    "softmax: fp32": lambda o: o.softmax_cpu(torch.randn(2, 16)),
    "softmax: a 0-d tensor": lambda o: o.softmax_cpu(torch.tensor(1.0, dtype=_bf16)),
    "add_layer_norm in place: x not contiguous": lambda o: o.add_layer_norm_cpu_(
        *(torch.randn(8, 4).t(), torch.randn(4, 8).bfloat16(), None),
        *(torch.ones(8), torch.zeros(8), 1e-6),
    ),
    "add_layer_norm in place: a bias of another width": lambda o: o.add_layer_norm_cpu_(
        *(torch.randn(4, 8), torch.randn(4, 8).bfloat16(), torch.ones(4)),
        *(torch.ones(8), torch.zeros(8), 1e-6),
    ),
    "gelu with a bias: a bias of another width": lambda o: o.gelu_tanh_bias_cpu(
        torch.randn(4, 8), torch.ones(4)
    ),
    "gelu with a bias: an fp16 x": lambda o: o.gelu_tanh_bias_cpu(
        torch.randn(4, 8).half(), torch.ones(8)
    ),
    "softmax dropout: fp32": lambda o: o.softmax_dropout_cpu(torch.randn(2, 16), 0.1),
    "softmax dropout backward: y of another shape": lambda o: o.softmax_dropout_cpu_backward(
        torch.randn(2, 16).bfloat16(), torch.randn(2, 8).bfloat16(), torch.zeros(2, dtype=_i64), 0.1
    ),
    "softmax dropout backward: 1 seed": lambda o: o.softmax_dropout_cpu_backward(
        torch.randn(2, 16).bfloat16(),
        torch.randn(2, 16).bfloat16(),
        torch.zeros(1, dtype=_i64),
        0.1,
    ),
}


@pytest.mark.parametrize("case", list(_REFUSED))
def test_every_kernel_call_checks_its_tensors_first(case):
    with pytest.raises(ValueError, match=r"the native \w+ kernel needs .*; got "):
        _REFUSED[case](torch.ops.eanet)
