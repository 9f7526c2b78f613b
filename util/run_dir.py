"""The run's output folder: writable before any work starts, and used by one training run at a time."""
import contextlib
import fcntl
import os
import tempfile
from util.errors import RunDirError


_held = {}


def check_writable(folder, flag):
    """Create folder if needed and write a file in it, so that a run whose saves would fail stops at once."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise RunDirError(f"{flag} {folder}: exists and is not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder) as f:  # one byte: a full disk fails here too
            f.write(b"x")
            f.flush()
    except OSError as e:
        raise RunDirError(f"{flag} {folder}: cannot write there ({e.strerror or e})") from None


def check_file(path):
    """A file the run appends to (log.txt) is a regular file where it exists."""
    if os.path.lexists(path) and not os.path.isfile(path):
        raise RunDirError(f"{path}: exists and is not a file")


def lock(folder):
    """Hold an exclusive lock on folder/.lock for the life of this process (the kernel drops it when the
    process ends, even killed, so a crashed run never leaves it stuck); a second run stops here."""
    path = os.path.join(folder, ".lock")
    try:
        f = open(path, "a+")
    except OSError as e:
        raise RunDirError(f"--output_dir {folder}: cannot write there ({e.strerror or e})") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        owner = f.read().strip() or "another process"
        f.close()
        raise RunDirError(f"--output_dir {folder}: another training run ({owner}) is writing there; "
                          "wait for it to end or choose another --output_dir") from None
    try:
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        f.flush()
    except OSError as e:
        with contextlib.suppress(OSError):  # the buffered line fails again; the file is closed all the same
            f.close()
        raise RunDirError(f"--output_dir {folder}: cannot write there ({e.strerror or e})") from None
    _held[os.path.realpath(folder)] = f
