"""The dataset index at ImageNet's size: the samples of a walk that stats every file, from directory entries
alone; one scan for all ranks; an index that loader workers read without copying it."""
import hashlib
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import paddle
import pytest

from conftest import ROOT
from data import make_image_folder
from util.datasets import ImageFolder
from util.image_index import IMG_EXTENSIONS, SampleIndex, class_difference
from util.errors import DataError


def walked(root):
    """The reference: (path, label) by os.walk, stat-ing every entry (the rules ImageFolder keeps)."""
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    reals = {os.path.realpath(root)} | {os.path.realpath(os.path.join(root, c)) for c in classes}
    samples = []
    for label, c in enumerate(classes):
        folder, found = os.path.join(root, c), []
        for dirpath, dirnames, names in os.walk(folder, followlinks=True):
            for d in sorted(dirnames):
                real = os.path.realpath(os.path.join(dirpath, d))
                if real in reals or os.path.realpath(folder).startswith(real + os.sep):
                    dirnames.remove(d)
                else:
                    reals.add(real)
            found.append((dirpath, names))
        for dirpath, names in sorted(found):
            for n in sorted(names):
                path = os.path.join(dirpath, n)
                if n.lower().endswith(IMG_EXTENSIONS) and not (os.path.exists(path) and not os.path.isfile(path)):
                    samples.append((path, label))
    return samples


@pytest.fixture
def tree(tmp_path):
    """Class folders with nested folders, links to files and folders (inside and outside the dataset),
    a pipe, a dangling link, other files and upper-case extensions."""
    root = str(tmp_path / "train")
    make_image_folder(str(tmp_path), classes=3, per_class=5, split="train", modes=False)
    c0, c1 = os.path.join(root, "class_0"), os.path.join(root, "class_1")
    os.makedirs(os.path.join(c0, "deeper", "deepest"))
    shutil.copy(os.path.join(c0, "img_0.png"), os.path.join(c0, "deeper", "B.PNG"))
    shutil.copy(os.path.join(c0, "img_1.png"), os.path.join(c0, "deeper", "deepest", "a.jpg"))
    os.symlink(os.path.join(c1, "img_2.png"), os.path.join(c0, "linked_file.png"))
    os.symlink("../class_2", os.path.join(c1, "to_class_2"))
    os.symlink("..", os.path.join(c1, "loop"))
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(os.path.join(c0, "img_3.png"), outside / "far.png")
    os.symlink(str(outside), os.path.join(c1, "outside"))
    os.mkfifo(os.path.join(c1, "pipe.png"))
    os.symlink(os.path.join(c1, "gone.png"), os.path.join(c1, "dangling.png"))
    (tmp_path / "train" / "class_2" / "notes.txt").write_text("not an image")
    return root


def test_index_equals_a_walk_that_stats_every_file(tree, capsys):
    data = ImageFolder(tree)
    assert list(data.samples) == walked(tree)
    assert len(data) == 20 and data.classes == ["class_0", "class_1", "class_2"]
    out = capsys.readouterr().out
    for name in ("to_class_2", "loop", "pipe.png"):
        assert f"Warning: skipping {os.path.join(tree, 'class_1', name)}" in out
    assert data.samples[-1] == walked(tree)[-1] and data.samples[3:5] == walked(tree)[3:5]


def test_sample_index_keeps_paths_and_labels():
    paths = ["a/b.png", "ü/ç é.jpg", "x" * 300 + ".png", "\udcff.png"]  # non-UTF-8 bytes survive (surrogates)
    index = SampleIndex(paths, [3, -1, 0, 7])
    assert list(index) == list(zip(paths, [3, -1, 0, 7])) and len(index) == 4 and index[-1] == (paths[3], 7)
    with pytest.raises(IndexError):
        index[4]


def test_class_difference_names_a_few_of_each_kind():
    """What the class checks (a split against train/, a checkpoint against its data) print: the missing and the
    extra names, five of each at most with the count (ImageNet has 1000)."""
    assert class_difference(["a", "b", "x"], ["a", "b", "c"]) == "missing c; extra x"
    many = [f"n{i:02d}" for i in range(12)]
    assert class_difference([], many) == "missing n00, n01, n02, n03, n04, ... (12 in all)"
    assert class_difference(["b", "a"], ["a", "b"]) == "the same names in another order"


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_no_stat_per_image_file(tmp_path):
    """strace counts the stat-family calls of a scan of 4,000 files in 40 class folders, beyond Python's
    own start-up (the same script without the scan): at most 0.05 per file."""
    root = tmp_path / "big"
    src = tmp_path / "src.png"
    make_image_folder(str(tmp_path), classes=1, per_class=1, split="one", modes=False)
    shutil.copy(tmp_path / "one" / "class_0" / "img_0.png", src)
    for c in range(40):
        (root / f"n{c:08d}").mkdir(parents=True)
        for i in range(100):
            os.link(src, root / f"n{c:08d}" / f"{i:05d}.JPEG")

    def stat_calls(scan):
        code = ("import sys; sys.path.insert(0, '.'); from util.datasets import ImageFolder; "
                + (f"print(len(ImageFolder({str(root)!r})))" if scan else "print(0)"))
        res = subprocess.run(["strace", "-f", "-c", "-e", "trace=%%stat", sys.executable, "-c", code], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        return res.stdout.split()[0], int(re.search(r"^\s*100\.00\s+[\d.]+\s+\d+\s+(\d+)\s.*total$",
                                                               res.stderr, re.M).group(1))

    (n, scanned), (_, baseline) = stat_calls(True), stat_calls(False)
    assert n == "4000" and baseline > 1000  # strace really counted (Python's imports stat thousands of paths)
    assert (scanned - baseline) / 4000 <= 0.05, (scanned, baseline)


def test_an_unreadable_folder_stops_the_scan_naming_it(tree, tmp_path):
    """Without the capabilities that let root read anything, a folder with no read permission is really
    unreadable: the scan stops naming it (a walk would leave its images out without a word)."""
    hidden = os.path.join(tree, "class_0", "deeper")
    os.chmod(hidden, 0)
    try:
        code = ("import sys; sys.path.insert(0, '.'); from util.datasets import ImageFolder, DataError\n"
                "import os; print('READABLE' if os.access(sys.argv[2], os.R_OK) else 'unreadable')\n"
                "try:\n    ImageFolder(sys.argv[1])\nexcept DataError as e:\n    print('error:', e)")
        res = subprocess.run(["setpriv", "--bounding-set", "-dac_override,-dac_read_search", sys.executable, "-c",
                              code, tree, hidden], cwd=ROOT, capture_output=True, text=True, timeout=120)
    finally:
        os.chmod(hidden, 0o755)
    assert res.stdout.splitlines()[0] == "unreadable", res.stdout + res.stderr  # the failure is real
    assert res.stdout.splitlines()[1] == f"error: {hidden}: cannot read the folder (Permission denied)", res.stdout


def _rank_scans(root, counts):
    import paddle.distributed as dist
    from util import datasets
    dist.init_parallel_env()
    scans = []
    real_scan = datasets.scan_image_folder
    datasets.scan_image_folder = lambda *a: scans.append(1) or real_scan(*a)
    data = ImageFolder(root)
    with open(counts, "a") as f:
        digest = hashlib.sha256(repr(list(data.samples)).encode()).hexdigest()
        f.write(f"{dist.get_rank()} {len(scans)} {digest} {len(data)} {data.classes}\n")
    try:
        ImageFolder(os.path.join(root, "class_0", "nothing"))
    except DataError as e:
        with open(counts, "a") as f:
            f.write(f"{dist.get_rank()} error {e}\n")


def test_rank_zero_scans_and_the_others_receive_the_index(tree, tmp_path):
    counts = tmp_path / "counts"
    paddle.distributed.spawn(_rank_scans, args=(tree, str(counts)), nprocs=2, backend="gloo")
    lines = sorted(counts.read_text().splitlines())
    scans = sorted(line for line in lines if " error " not in line)
    assert [line.split()[:2] for line in scans] == [["0", "1"], ["1", "0"]]  # one scan, on rank 0
    assert scans[0].split(" ", 2)[2] == scans[1].split(" ", 2)[2]  # the same samples and classes
    errors = [line.split(" ", 2)[2] for line in lines if " error " in line]
    assert errors == [f"{os.path.join(tree, 'class_0', 'nothing')}: dataset folder not found"] * 2


def _private_mb(pid):
    with open(f"/proc/{pid}/smaps_rollup") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return sum(int(fields[k].split()[0]) for k in ("Private_Clean", "Private_Dirty")) / 1024


def _read_all(samples, pipe):
    before = _private_mb(os.getpid())
    total = sum(len(samples[i][0]) for i in range(len(samples)))
    pipe.send((_private_mb(os.getpid()) - before, total))


@pytest.mark.parametrize("count", [300_000])
def test_a_worker_reads_the_index_without_copying_it(count):
    """A forked process that reads every sample's path grows by a few MB with the index, by its whole size
    with a list of tuples (the copy-on-write of their reference counts)."""
    import multiprocessing
    paths = [f"/data/imagenet/train/n{i % 1000:08d}/n{i % 1000:08d}_{i:07d}.JPEG" for i in range(count)]
    ctx = multiprocessing.get_context("fork")
    growth = {}
    for kind, samples in (("index", SampleIndex(paths, np.arange(count) % 1000)),
                          ("list", list(zip(paths, (i % 1000 for i in range(count)))))):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_read_all, args=(samples, child))
        proc.start()
        growth[kind], total = parent.recv()
        proc.join()
        assert total == sum(len(p) for p in paths)
    assert growth["index"] < 5 and growth["list"] > 20, growth
