"""The official released checkpoints by name: downloaded once per machine into a cache, checked, converted to
this project's format, and from then on loaded from there.

Cache: the scripts' --cache_dir, else $MAE_HOME, else $XDG_CACHE_HOME/mae_paddle, else ~/.cache/mae_paddle.
It holds only complete, checked files (NAME.pd); a download in progress lives in its partial/ folder and
continues where it stopped (HTTP range requests) when asked again. $MAE_MIRROR replaces the download host
(https://dl.fbaipublicfiles.com/mae), for clusters that reach the internet through a mirror of its tree.
"""
import contextlib
import fcntl
import http.client
import os
import sys
import time
import urllib.error
import urllib.request

from util.errors import CheckpointError, DownloadError
from util.weights import load_checkpoint, save_file
from util.files import file_digest

HOST = "https://dl.fbaipublicfiles.com/mae"


def _releases():
    """name -> (path under the host, published md5 prefix or None)."""
    out = {}
    for size, pre, fine in (("base", "8cad7c", "1b25e9"), ("large", "b8b06e", "51f550"), ("huge", "9bdbb0", "2541f2")):
        out[f"mae_pretrain_vit_{size}"] = (f"pretrain/mae_pretrain_vit_{size}.pth", pre)
        out[f"mae_pretrain_vit_{size}_full"] = (f"pretrain/mae_pretrain_vit_{size}_full.pth", None)
        out[f"mae_finetuned_vit_{size}"] = (f"finetune/mae_finetuned_vit_{size}.pth", fine)
        out[f"mae_visualize_vit_{size}"] = (f"visualize/mae_visualize_vit_{size}.pth", None)
    out["mae_visualize_vit_large_ganloss"] = ("visualize/mae_visualize_vit_large_ganloss.pth", None)
    return out


RELEASED = _releases()


def cache_dir():
    if os.environ.get("MAE_HOME"):
        return os.environ["MAE_HOME"]
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mae_paddle")


def url_of(name):
    return f"{os.environ.get('MAE_MIRROR') or HOST}".rstrip("/") + "/" + RELEASED[name][0]


def resolve(path_or_name, cache=None):
    """A local file for a path, or for a released name the cached converted checkpoint (fetched on first
    use into `cache`, default cache_dir()); anything else unchanged, for the caller's 'not found'."""
    name = path_or_name[:-4] if path_or_name.endswith(".pth") else path_or_name
    if os.path.exists(path_or_name) or name not in RELEASED:
        return path_or_name
    return fetch(name, cache)


def fetch(name, cache=None):
    """The cached NAME.pd, downloading and converting it first if needed; one process at a time per name, so
    that ranks starting together download once."""
    folder = cache or cache_dir()
    final = os.path.join(folder, f"{name}.pd")
    try:
        os.makedirs(os.path.join(folder, "partial"), exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create the checkpoint cache {folder} ({e.strerror}); choose another with "
                            "--cache_dir or MAE_HOME") from None
    with open(os.path.join(folder, "partial", f"{name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isfile(final):
            try:
                load_checkpoint(final)
                return final
            except CheckpointError as e:
                print(f"cached {final} is damaged ({e}); fetching it again", file=sys.stderr)
                os.remove(final)
        by_hand = final[:-3] + ".pth"
        hand = f"the official {os.path.basename(RELEASED[name][0])} can be put at {by_hand} by hand"
        if os.path.isfile(by_hand):
            check_and_convert(name, by_hand, final, hand, remove=False)
            return final
        part = os.path.join(folder, "partial", f"{name}.pth.part")
        download(url_of(name), part, hand)
        check_and_convert(name, part, final, hand)
        return final


def download(url, part, hand):
    """url into `part`, continuing an earlier partial download where the server allows."""
    have = os.path.getsize(part) if os.path.isfile(part) else 0
    try:
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    except ValueError as e:
        raise DownloadError(f"{url}: not a download address ({e}); check MAE_MIRROR") from None
    try:
        with contextlib.closing(urllib.request.urlopen(request, timeout=60)) as response:
            resumed = have and response.status == 206
            total = int(response.headers.get("Content-Length", 0)) + (have if resumed else 0)
            with open(part, "ab" if resumed else "wb") as f:
                copy_with_progress(response, f, have if resumed else 0, total, url)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the part is already whole
            return
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}; {hand}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or repr(e)
        raise DownloadError(f"{url}: {reason}; run again to continue the download; {hand}") from None
    if total and os.path.getsize(part) != total:
        raise DownloadError(f"{url}: the connection ended after {os.path.getsize(part)} of {total} bytes; run "
                            f"again to continue the download; {hand}")


def copy_with_progress(response, f, done, total, url):
    """Copy in 1 MiB blocks; the size, speed and time left on stderr (a line every 10% when not a terminal)."""
    start, shown = time.time(), -1
    print(f"Downloading {url}", file=sys.stderr)
    while True:
        block = response.read(1 << 20)
        if not block:
            break
        f.write(block)
        done += len(block)
        rate = done / max(time.time() - start, 1e-6)
        left = f"{(total - done) / rate:.0f} s left" if total else ""
        line = f"  {done / 2 ** 20:.1f} / {total / 2 ** 20:.1f} MiB, {rate / 2 ** 20:.1f} MiB/s, {left}"
        tenth = int(10 * done / total) if total else -1
        if sys.stderr.isatty():
            print("\r" + line, end="", file=sys.stderr, flush=True)
        elif tenth != shown:
            print(line, file=sys.stderr, flush=True)
            shown = tenth
    if sys.stderr.isatty():
        print(file=sys.stderr)


def check_and_convert(name, part, final, hand, remove=True):
    """The published md5 prefix (where there is one) and a readable checkpoint; then NAME.pd, atomically.
    A downloaded file is removed afterwards, also when it fails, so that the next run fetches it anew."""
    expected = RELEASED[name][1]
    try:
        if expected:
            md5 = file_digest(part, "md5")
            if not md5.startswith(expected):
                raise DownloadError(f"{url_of(name)}: md5 {md5[:6]}... is not the published {expected}...; {hand}")
        try:
            ckpt = load_checkpoint(part)
        except CheckpointError as e:
            raise DownloadError(f"{url_of(name)}: not a readable checkpoint ({e}); {hand}") from None
        save_file({"model": ckpt["model"]}, final)
        print(f"saved {final}", file=sys.stderr)
    finally:
        if remove and os.path.exists(part):
            os.remove(part)
