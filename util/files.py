"""Writing files so that a reader sees the old file or the whole new one, never a part; file checksums."""
import contextlib
import hashlib
import os


@contextlib.contextmanager
def atomic_write(path, suffix=""):
    """Yield a temporary path beside `path` (ending in `suffix`, for writers that choose a format by it) to
    write; when the block ends without error, flush it to disk and rename it over `path`. On any error the
    temporary file is removed and `path` is left as it was."""
    tmp = f"{path}.tmp.{os.getpid()}{suffix}"
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def write_text(path, text):
    """`text` into `path`, atomically."""
    with atomic_write(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def file_digest(path, algorithm="sha256"):
    """The hex digest of a file (read in 16 MiB blocks), by default its SHA-256."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()
