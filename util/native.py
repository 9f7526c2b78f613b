"""Native CPU code built at run time: one place that builds, caches and loads it, so that nothing about a
compiler or a cache folder can crash or hang a run.

The build folder is Paddle's: $PADDLE_EXTENSION_DIR, else ~/.cache/paddle_extensions. A library is cached
under a key of its source, the machine architecture, the compiler (its --version line) and the flags, with
the SHA-256 of the file beside it. A build runs in its own process group under a time limit
($MAE_NATIVE_TIMEOUT seconds, default 300) in a private folder, and is renamed into place only when complete.
A build the compiler refuses (an error in the source, a missing compiler, a library without the symbols its
caller needs) is remembered for its key (a `.failed` file with the reason: delete it to retry), so that
later processes and ranks don't retry it; a time limit, a signal or a full disk is not remembered, and the
warning names it. Any failure (no compiler, a compiler error or time-out, an
unusable build folder, a file system without flock, a lock held too long, a damaged or foreign library)
gives one warning per run and None: the caller then uses Paddle's ops and Pillow. MAE_NATIVE=0 turns every
build off."""
import contextlib
import errno
import fcntl
import glob
import hashlib
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from util.files import file_digest, write_text


_warned = []  # a warning was printed in this process (forked loader workers start with their parent's)


def enabled():
    return os.environ.get("MAE_NATIVE", "1") != "0"


MAX_TIMEOUT = 86400.0


def timeout():
    """$MAE_NATIVE_TIMEOUT in seconds (default 300); ValueError naming it unless it is in [1, MAX_TIMEOUT]."""
    value = os.environ.get("MAE_NATIVE_TIMEOUT", "300")
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 1.0 <= seconds <= MAX_TIMEOUT:
        raise ValueError(f"MAE_NATIVE_TIMEOUT={value!r}: must be a number of seconds in [1, {MAX_TIMEOUT:.0f}]")
    return seconds


def build_directory():
    """Paddle's extension folder (paddle.utils.cpp_extension.get_build_directory, without importing it)."""
    return os.path.abspath(os.environ.get("PADDLE_EXTENSION_DIR")
                           or os.path.join(os.path.expanduser("~"), ".cache", "paddle_extensions"))


def warn(message):
    """One warning per run: rank 0 prints it, the first time in the process (or the process it was forked
    from)."""
    if _warned:
        return
    _warned.append(message)
    if os.environ.get("PADDLE_TRAINER_ID", "0") == "0":
        print(f"warning: {message}", file=sys.stderr, flush=True)


def compiler_version(compiler):
    """The compiler's --version line ('missing' when it does not answer within 5 s)."""
    try:
        out = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=5,
                             stdin=subprocess.DEVNULL)
        return (out.stdout.strip().splitlines() or ["?"])[0]
    except (OSError, subprocess.SubprocessError):
        return "missing"


def cache_key(sources, compiler, flags):
    digest = hashlib.sha256()
    for path in sources:
        with open(path, "rb") as f:
            digest.update(f.read())
    for part in (platform.machine(), compiler, compiler_version(compiler), *flags):
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()[:16]


def _elf_header(path):
    """(class, machine) of an ELF file, None for anything else."""
    with open(path, "rb") as f:
        head = f.read(20)
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    return head[4], head[18:20]


def check_library(path):
    """Reason why the cached file at path cannot be this machine's library, or None when it can."""
    with open(path + ".sha256") as f:
        if f.read().strip() != file_digest(path):
            return f"{path} does not match its recorded checksum"
    own = _elf_header(os.path.realpath(sys.executable))
    if own is not None and _elf_header(path) != own:
        return f"{path} is not a library for this machine ({platform.machine()})"
    return None


def _run_build(command, cwd, env, limit):
    """Run the build command in its own process group: (ok, reason, lasting). A failure is lasting (worth
    remembering) when it is the compiler's answer to the source; a time limit, a signal or a full disk is
    not."""
    try:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, text=True, errors="replace")
    except OSError as e:
        return False, f"{command[0]}: {e.strerror}", e.errno != errno.ENOSPC
    try:
        out, _ = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return False, f"the build did not finish within {limit:.0f} s (MAE_NATIVE_TIMEOUT)", False
    if proc.returncode == 0:
        return True, "", False
    lines = [line.strip() for line in out.strip().splitlines()]
    full = [line for line in lines if "No space left on device" in line]
    if full:
        return False, f"the disk is full: {full[0][:300]}", False
    if proc.returncode < 0:
        return False, f"the build was killed by {signal.Signals(-proc.returncode).name}", False
    errors = [line for line in lines if "error" in line.lower()]
    return False, (errors or lines or [f"exit code {proc.returncode}"])[0][:300], True


def _lock(path, limit):
    """An exclusive flock on path within limit seconds: the open file, or raise OSError with the reason."""
    f = open(path, "a")
    deadline = time.monotonic() + limit
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                f.close()
                raise OSError(e.errno, f"cannot lock {path} ({e.strerror}): the file system has no flock")
            if time.monotonic() > deadline:
                f.close()
                raise OSError(errno.ETIMEDOUT, f"{path} stayed locked by another process for {limit:.0f} s")
            time.sleep(0.2)


def library(name, sources, compiler, flags, build_command, find_output):
    """Path of the built library `name` for this machine, building it once if needed; None (after one
    warning per run) when that is not possible. build_command(out_dir) is the command that builds into
    out_dir; find_output(out_dir) names the library it produced. A caller that finds the library unusable
    (a symbol missing) calls reject()."""
    if not enabled():
        return None
    try:
        folder = build_directory()
        os.makedirs(folder, exist_ok=True)
        key = cache_key(sources, compiler, flags)
        path = os.path.join(folder, f"{name}_{key}.so")
        failed = path + ".failed"
        if not os.path.exists(path + ".sha256"):
            with _lock(path + ".lock", timeout()):
                if not os.path.exists(path + ".sha256") and not os.path.exists(failed):
                    _build(path, folder, build_command, find_output)
        if os.path.exists(failed):
            with open(failed) as f:
                raise OSError(f"{f.read().strip()} (remembered in {failed}; delete it to retry)")
        reason = check_library(path)
        if reason:
            raise OSError(f"{reason}; delete it to rebuild")
        return path
    except (OSError, ValueError) as e:
        warn(f"native CPU code {name} not used: {describe(e)}; running on Paddle's ops and Pillow")
        return None


def reject(path, reason):
    """A built library that cannot serve (the compiler produced it without a symbol its caller needs): removed
    from the cache and remembered as a failure of its key, with one warning."""
    for stale in (path, path + ".sha256"):
        with contextlib.suppress(OSError):
            os.remove(stale)
    with contextlib.suppress(OSError):
        write_text(path + ".failed", reason + "\n")
    warn(f"native CPU code {os.path.basename(path)} not used: {reason}; running on Paddle's ops and Pillow")


def describe(error):
    """One line for an OSError or ValueError: its message and the file it names; a full disk says so."""
    strerror, filename = getattr(error, "strerror", None), getattr(error, "filename", None)
    full = " (the disk is full)" if getattr(error, "errno", None) == errno.ENOSPC else ""
    if strerror and filename:
        return f"{filename}: {strerror}{full}"
    return str(strerror or error).splitlines()[0] + full


def _build(path, folder, build_command, find_output):
    """Build into a private folder, then move the library into place with its checksum. A lasting failure
    (see _run_build) is written to the .failed file; any failure raises OSError with its reason. Folders of
    earlier builds of this key that were killed half-way go first (the caller holds the key's lock, so no
    build of it is running)."""
    for stale in glob.glob(glob.escape(path) + ".build.*"):
        shutil.rmtree(stale, ignore_errors=True)
    work = tempfile.mkdtemp(prefix=os.path.basename(path) + ".build.", dir=folder)
    try:
        ok, reason, lasting = _run_build(build_command(work), work, dict(os.environ), timeout())
        output = find_output(work) if ok else None
        if ok and not output:
            ok, reason, lasting = False, "the build produced no library", True
        if not ok:
            if lasting:
                with contextlib.suppress(OSError):  # unremembered on a full disk: the next run tries again
                    write_text(path + ".failed", reason + "\n")
            raise OSError(reason)
        os.replace(output, path)
        write_text(path + ".sha256", file_digest(path) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
