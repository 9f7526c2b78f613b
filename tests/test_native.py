"""Native builds never break or hang a run: every failure of the compiler, the build folder, its lock or
the cached library gives one warning per run and the Paddle/Pillow path (each case made real here)."""
import fcntl
import glob
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from util import native
from util.files import file_digest

PROBE = ("import sys; sys.path.insert(0, '.'); from util import fast_image, cpu_kernels; "
         "print(fast_image.available(), cpu_kernels.available())")


def probe(tmp_path, code=PROBE, timeout=120, **env):
    env = {**os.environ, "PADDLE_EXTENSION_DIR": str(tmp_path / "ext"), "MAE_NATIVE_TIMEOUT": "3", **env}
    start = time.monotonic()
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout)
    res.seconds = time.monotonic() - start
    res.warnings = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
    return res


def compiler(tmp_path, body):
    """A fake compiler: answers --version, records each build call in calls.txt, then runs body."""
    path = tmp_path / "cc"
    path.write_text(f"#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'fakecc 1.0'; exit 0; fi\n"
                    f"echo build >> {tmp_path}/calls.txt\n{body}\n")
    path.chmod(0o755)
    return str(path)


def calls(tmp_path):
    f = tmp_path / "calls.txt"
    return len(f.read_text().splitlines()) if f.exists() else 0


def assert_fell_back(res, words):
    assert res.returncode == 0 and res.stdout.split() == ["False", "False"], res.stderr[-2000:]
    assert len(res.warnings) == 1 and words in res.warnings[0], res.warnings
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("name", ["missing", "error"])
def test_no_compiler_or_a_compiler_error_is_remembered(tmp_path, name):
    cc = str(tmp_path / "no-such-cc") if name == "missing" else compiler(tmp_path, "echo 'x.c:1: error: boom'; exit 1")
    first = probe(tmp_path, CC=cc, MAE_NATIVE_TIMEOUT="120")  # time for Paddle's extension tool to call it
    assert_fell_back(first, "boom" if name == "error" else "")
    assert len(glob.glob(str(tmp_path / "ext" / "*.failed"))) == 2
    built = calls(tmp_path)
    second = probe(tmp_path, CC=cc, MAE_NATIVE_TIMEOUT="120")
    assert_fell_back(second, "delete it to retry")
    assert calls(tmp_path) == built  # no process retries a failed build


def test_a_compiler_that_never_returns_is_stopped(tmp_path):
    res = probe(tmp_path, CC=compiler(tmp_path, f"echo $$ >> {tmp_path}/pids; exec sleep 1000"))
    assert_fell_back(res, "did not finish within 3 s")
    assert res.seconds < 60
    pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
    assert pids  # the build really started
    time.sleep(0.5)
    for pid in pids:  # this test's own compilers, not any other `sleep 1000` on the machine
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read(), pid


@pytest.mark.parametrize("kind", ["under_a_file", "read_only"])
def test_an_unusable_build_folder(tmp_path, kind):
    if kind == "under_a_file":
        (tmp_path / "file").write_text("x")
        res = probe(tmp_path, PADDLE_EXTENSION_DIR=str(tmp_path / "file" / "ext"))
        assert_fell_back(res, "Not a directory")
        return
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("no mount namespaces here")
    ro = tmp_path / "ro"
    ro.mkdir()
    cmd = (f"mount --bind -o ro {ro} {ro} && touch {ro}/x 2>/dev/null && echo WRITABLE; "
           f"exec {sys.executable} -c \"{PROBE}\"")
    env = {**os.environ, "PADDLE_EXTENSION_DIR": str(ro), "MAE_NATIVE_TIMEOUT": "3"}
    res = subprocess.run(["unshare", "-m", "sh", "-c", cmd], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert "WRITABLE" not in res.stdout  # the folder really is read-only
    res.warnings = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
    assert_fell_back(res, "Read-only file system")


def test_a_file_system_without_flock(tmp_path):
    code = ("import errno, fcntl\n"
            "def no_locks(*a): raise OSError(errno.ENOLCK, 'No locks available')\n"
            "fcntl.flock = no_locks\n" + PROBE)
    assert_fell_back(probe(tmp_path, code), "has no flock")


def test_a_lock_held_by_a_hung_process(tmp_path):
    (tmp_path / "ext").mkdir()
    key = native.cache_key([os.path.join(ROOT, "util", "fast_image.c")], os.environ.get("CC", "cc"),
                           ["-O3", "-ffp-contract=off", "-shared", "-fPIC"])
    with open(tmp_path / "ext" / f"mae_fast_image_{key}.so.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        res = probe(tmp_path, "import sys; sys.path.insert(0, '.'); from util import fast_image; "
                              "print(fast_image.available(), False)")
    assert_fell_back(res, "stayed locked by another process for 3 s")


def test_a_damaged_or_foreign_library_in_the_cache(tmp_path):
    code = "import sys; sys.path.insert(0, '.'); from util import fast_image; print(fast_image.available(), False)"
    res = probe(tmp_path, code)
    assert res.stdout.split() == ["True", "False"] and not res.warnings, res.stderr
    library = glob.glob(str(tmp_path / "ext" / "mae_fast_image_*.so"))[0]
    with open(library, "r+b") as f:  # a library damaged after its checksum was recorded
        f.seek(100)
        f.write(b"garbage")
    assert_fell_back(probe(tmp_path, code), "does not match its recorded checksum")
    with open(library, "r+b") as f:  # an ELF file for another machine (aarch64 here), checksum matching
        f.seek(18)
        f.write(b"\xb7\x00" if os.uname().machine != "aarch64" else b"\x3e\x00")
    with open(library + ".sha256", "w") as f:
        f.write(file_digest(library))
    assert_fell_back(probe(tmp_path, code), "not a library for this machine")


def test_a_build_killed_half_way_leaves_nothing_to_load(tmp_path):
    code = "import sys; sys.path.insert(0, '.'); from util import fast_image; print(fast_image.available())"
    env = {**os.environ, "PADDLE_EXTENSION_DIR": str(tmp_path / "ext"),
           "CC": compiler(tmp_path, f"echo $$ > {tmp_path}/started; exec sleep 1002")}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (tmp_path / "started").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (tmp_path / "started").exists()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    os.kill(int((tmp_path / "started").read_text()), signal.SIGKILL)  # the compiler, in a session of its own
    assert not glob.glob(str(tmp_path / "ext" / "*.so"))  # nothing half-built at the cached path
    res = probe(tmp_path, code)
    assert res.stdout.split() == ["True"] and not res.warnings, res.stderr  # the next run builds
    assert glob.glob(str(tmp_path / "ext" / "*.build.*"))  # the killed build's folder (another key)
    res = probe(tmp_path, code, CC=compiler(tmp_path, 'exec cc "$@"'))  # the killed build's key, now working
    assert res.stdout.split() == ["True"] and not res.warnings, res.stderr
    assert not glob.glob(str(tmp_path / "ext" / "*.build.*"))  # its build cleared what the killed one left


def test_native_off(tmp_path):
    res = probe(tmp_path, MAE_NATIVE="0")
    assert res.stdout.split() == ["False", "False"] and not res.warnings and not (tmp_path / "ext").exists()


def test_cache_key_names_machine_compiler_and_flags(tmp_path, monkeypatch):
    source = tmp_path / "a.c"
    source.write_text("int f(void) { return 1; }\n")
    key = native.cache_key([str(source)], "gcc", ["-O3"])
    assert native.cache_key([str(source)], "gcc", ["-O2"]) != key
    assert native.cache_key([str(source)], compiler(tmp_path, "exit 1"), ["-O3"]) != key
    monkeypatch.setattr(native.platform, "machine", lambda: "aarch64" if os.uname().machine != "aarch64" else "x86_64")
    assert native.cache_key([str(source)], "gcc", ["-O3"]) != key


@pytest.mark.slow
def test_one_warning_per_run_across_ranks_and_loader_workers(tmp_path):
    """Two ranks under the launcher, each with loader workers, and no compiler: one warning in all logs."""
    from helpers import run_script
    data = os.path.join(ROOT, "demo", "fashion_mnist_small")
    res = run_script("-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(tmp_path / "log"),
                     "main_pretrain.py", "--model", "mae_vit_micro_patch4", "--input_size", "28", "--device", "cpu",
                     "--num_workers", "2", "--batch_size", "250", "--epochs", "1", "--warmup_epochs", "0",
                     "--data_path", data, "--output_dir", str(tmp_path / "out"), "--log_dir", str(tmp_path / "out"),
                     env={"CC": str(tmp_path / "no-such-cc"), "PADDLE_EXTENSION_DIR": str(tmp_path / "ext")})
    logs = "".join(open(p).read() for p in glob.glob(str(tmp_path / "log" / "workerlog.*")))
    assert res.returncode == 0, logs[-3000:]
    assert logs.count("warning: native CPU code") == 1, logs


FAST_ONLY = "import sys; sys.path.insert(0, '.'); from util import fast_image; print(fast_image.available(), False)"


def test_a_time_limit_or_signal_is_not_remembered(tmp_path):
    """A build cut off by the time limit, or killed by a signal, is tried again by the next run (the same
    compiler, then answering), which uses the fused code without a warning."""
    cc = compiler(tmp_path, "exec sleep 1000")
    assert_fell_back(probe(tmp_path, FAST_ONLY, CC=cc), "did not finish within 3 s")
    assert not glob.glob(str(tmp_path / "ext" / "*.failed"))
    compiler(tmp_path, "kill -9 $$")
    assert_fell_back(probe(tmp_path, FAST_ONLY, CC=cc), "killed by SIGKILL")
    assert not glob.glob(str(tmp_path / "ext" / "*.failed"))
    compiler(tmp_path, 'exec cc "$@"')  # the same path and --version: the same cache key
    res = probe(tmp_path, FAST_ONLY, CC=cc)
    assert res.stdout.split() == ["True", "False"] and not res.warnings, res.stderr
    assert calls(tmp_path) == 3


def test_a_full_disk_is_named_and_not_remembered(tmp_path):
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("no mount namespaces here")
    ext = tmp_path / "ext"
    ext.mkdir()
    cc = compiler(tmp_path, 'exec cc "$@"')
    cmd = (f"mount -t tmpfs -o size=256k tmpfs {ext} && (head -c 1m /dev/zero > {ext}/filler 2>/dev/null; "
           f"df -k {ext} | tail -1 | awk '{{print \"FREE\", $4}}'); exec {sys.executable} -c \"{FAST_ONLY}\"")
    env = {**os.environ, "PADDLE_EXTENSION_DIR": str(ext), "MAE_NATIVE_TIMEOUT": "60", "CC": cc}
    res = subprocess.run(["unshare", "-m", "sh", "-c", cmd], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert "FREE 0" in res.stdout  # the disk really was full
    assert calls(tmp_path) == 1  # and the compiler ran
    res.stdout = res.stdout.split("\n", 1)[1]
    res.warnings = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
    assert res.stdout.split() == ["False", "False"] and len(res.warnings) == 1, res.stderr
    assert "disk is full" in res.warnings[0] and "No space left on device" in res.warnings[0], res.warnings
    assert "Traceback" not in res.stderr
    res = probe(tmp_path, FAST_ONLY, CC=cc)  # the same folder, no longer full: built, nothing remembered
    assert res.stdout.split() == ["True", "False"] and not res.warnings, res.stderr


def test_a_library_without_its_symbols_is_refused_and_remembered(tmp_path):
    """A compiler that links a valid library lacking the expected functions: one warning naming them, the
    Pillow path, and the next run falls back at once instead of loading it again."""
    cc = compiler(tmp_path, 'while [ $# -gt 1 ]; do [ "$1" = -o ] && out=$2; shift; done; '
                            'echo "int unrelated(void) { return 0; }" | exec cc -shared -fPIC -x c - -o "$out"')
    res = probe(tmp_path, FAST_ONLY, CC=cc)
    assert_fell_back(res, "lacks resize_bicubic_rgb, mirror_rgb, affine_rgb, normalize_nhwc, erase_boxes")
    assert not glob.glob(str(tmp_path / "ext" / "*.so")) and glob.glob(str(tmp_path / "ext" / "*.failed"))
    assert_fell_back(probe(tmp_path, FAST_ONLY, CC=cc), "delete it to retry")
    assert calls(tmp_path) == 1


def test_custom_operators_missing_from_a_library_are_refused(tmp_path, monkeypatch):
    from util import compat, cpu_kernels
    monkeypatch.setattr(native, "library", lambda *a: str(tmp_path / "k.so"))
    monkeypatch.setattr(compat, "register_custom_ops", lambda path: ["mae_softmax"])
    rejected = []
    monkeypatch.setattr(native, "reject", lambda path, reason: rejected.append((path, reason)))
    assert cpu_kernels._load() is False
    assert rejected == [(str(tmp_path / "k.so"), "the library lacks the operator(s) mae_adamw, mae_bias_gelu, "
                         "mae_layer_norm, mae_merge_heads, mae_residual_drop_path, mae_split_heads")]


@pytest.mark.parametrize("value", ["inf", "nan", "0", "-5", "soon", "1e9"])
def test_a_bad_time_limit_is_refused_at_start(tmp_path, value):
    from helpers import run_script
    res = run_script("main_pretrain.py", "--model", "mae_vit_micro_patch4", "--device", "cpu", "--data_path",
                     str(tmp_path), "--output_dir", str(tmp_path / "out"), env={"MAE_NATIVE_TIMEOUT": value})
    assert res.returncode == 2 and f"MAE_NATIVE_TIMEOUT={value!r}" in res.stderr.strip().splitlines()[-1], res.stderr
    assert not (tmp_path / "out").exists()
    assert_fell_back(probe(tmp_path, MAE_NATIVE_TIMEOUT=value), f"MAE_NATIVE_TIMEOUT={value!r}")
