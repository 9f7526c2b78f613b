"""What the project costs at ImageNet's size, on an ImageNet-shaped folder of hard links (no disk used):
the index, the loader workers' memory, beside the reference implementations.

    python experiments/scale/bench.py --root /tmp/imagenet_shape --make      # 1000 classes, 1,281,167 / 50,000
    python experiments/scale/bench.py --root /tmp/imagenet_shape --job index --torch_python /tmp/tv/bin/python
    python experiments/scale/bench.py --root /tmp/imagenet_shape --job loader
    python experiments/scale/bench.py --root /tmp/imagenet_shape --job knn --reference
    python experiments/scale/bench.py --root /tmp/imagenet_shape --job extract

index: seconds of ImageFolder(train/) here and torchvision's ImageFolder, alternating (--rounds), and the
stat-family system calls of a scan of val/ per image file (strace -c, minus the same interpreter's start-up).
loader: the private memory (Private_Clean + Private_Dirty of /proc/PID/smaps_rollup) of each loader worker
after its first batch and after --batches batches of --batch_size, with this project's compact sample index
and with the samples as a Python list of tuples (as the official code and torchvision keep them).
knn: util.features.knn_top1 against the same run's float32 matrix product (and a float64 search).
extract: main_extract.py's peak memory for several numbers of images.
"""
import argparse
import io
import os
import re
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCES = 64  # small JPEGs every file links to (ext4 allows ~65,000 links per file)


def counts(total, classes):
    """Images per class: as even as possible, summing to total."""
    return [total // classes + (1 if c < total % classes else 0) for c in range(classes)]


def make(root, train, val, classes):
    """root/{train,val}/nXXXXXXXX/*.JPEG as hard links to SOURCES small JPEGs in root/sources."""
    from PIL import Image
    sources = os.path.join(root, "sources")
    os.makedirs(sources, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(SOURCES):
        pixels = rng.integers(0, 256, (48, 64, 3), np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=85)
        with open(os.path.join(sources, f"{i}.JPEG"), "wb") as f:
            f.write(buf.getvalue())
    n = 0
    for split, total in (("train", train), ("val", val)):
        for c, count in enumerate(counts(total, classes)):
            folder = os.path.join(root, split, f"n{c:08d}")
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                path = os.path.join(folder, f"n{c:08d}_{i}.JPEG")
                if not os.path.exists(path):
                    os.link(os.path.join(sources, f"{n % SOURCES}.JPEG"), path)
                n += 1
    print(f"{root}: {train} train and {val} val files in {classes} classes")


OURS = ("import sys, time; sys.path.insert(0, {root!r}); from util.datasets import ImageFolder; "
        "t = time.perf_counter(); d = ImageFolder(sys.argv[1]); print(len(d), time.perf_counter() - t)")
THEIRS = ("import sys, time, torchvision; t = time.perf_counter(); d = torchvision.datasets.ImageFolder(sys.argv[1]); "
          "print(len(d), time.perf_counter() - t)")
BARE = "import sys, time; sys.path.insert(0, {root!r}); from util.datasets import ImageFolder; print(0, 0)"
BARE_THEIRS = "import sys, time, torchvision; print(0, 0)"


def run(python, code, folder, strace=False):
    cmd = [python, "-c", code, folder]
    if strace:
        cmd = ["strace", "-f", "-c", "-e", "trace=%%stat", *cmd]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        sys.exit(f"error: {' '.join(cmd[:3])} failed: {res.stderr.strip().splitlines()[-1]}")
    n, seconds = res.stdout.split()[-2:]
    calls = int(re.search(r"^\s*100\.00\s+[\d.]+\s+\d+\s+(\d+)\s.*total$", res.stderr, re.M).group(1)) if strace else 0
    return int(n), float(seconds), calls


def job_index(args):
    train, val = os.path.join(args.root, "train"), os.path.join(args.root, "val")
    ours, theirs = OURS.format(root=ROOT), THEIRS
    times = {"ours": [], "torchvision": []}
    for _ in range(args.rounds):
        n, s, _ = run(sys.executable, ours, train)
        times["ours"].append(s)
        if args.torch_python:
            m, t, _ = run(args.torch_python, theirs, train)
            assert m == n, (m, n)
            times["torchvision"].append(t)
    print(f"index of {train} ({n} files): ImageFolder here {min(times['ours']):.2f}-{max(times['ours']):.2f} s")
    if times["torchvision"]:
        ratios = [a / b for a, b in zip(times["ours"], times["torchvision"])]
        print(f"  torchvision ImageFolder {min(times['torchvision']):.2f}-{max(times['torchvision']):.2f} s; "
              f"ratio {min(ratios):.2f}-{max(ratios):.2f} ({', '.join(f'{r:.2f}' for r in ratios)})")
    n, _, calls = run(sys.executable, ours, val, strace=True)
    _, _, bare = run(sys.executable, BARE.format(root=ROOT), val, strace=True)
    print(f"stat-family calls scanning {val} ({n} files): {calls - bare} beyond start-up, "
          f"{(calls - bare) / n:.4f} per file")
    if args.torch_python:
        _, _, calls = run(args.torch_python, theirs, val, strace=True)
        _, _, bare = run(args.torch_python, BARE_THEIRS, val, strace=True)
        print(f"  torchvision: {calls - bare} beyond start-up, {(calls - bare) / n:.4f} per file")


def private_mb(pid):
    with open(f"/proc/{pid}/smaps_rollup") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return sum(int(fields[k].split()[0]) for k in ("Private_Clean", "Private_Dirty")) / 1024


def children(pid):
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(p) for p in f.read().split()]
    return out


def job_loader(args):
    sys.path.insert(0, ROOT)
    import paddle
    from util.datasets import ImageFolder, Loader
    from util.transforms import eval_transform

    data = ImageFolder(os.path.join(args.root, "train"), transform=eval_transform(32))
    for kind in ("index", "list"):
        if kind == "list":
            data.samples = list(data.samples)
        sampler = paddle.io.BatchSampler(data, batch_size=args.batch_size, shuffle=True, drop_last=True)
        loader = Loader(data, sampler, args.num_workers)
        first, earlier = None, set(children(os.getpid()))  # an earlier loader's workers may still be ending
        start = time.time()
        for i, _ in enumerate(loader):
            if i == 0:
                first = {p: private_mb(p) for p in children(os.getpid()) if p not in earlier}
            if i + 1 == args.batches:
                last = {p: private_mb(p) for p in first}
                break
        growth = [last[p] - first[p] for p in first]
        print(f"loader workers ({kind} of {len(data)} samples, {args.num_workers} workers, {args.batches} batches of "
              f"{args.batch_size}, {time.time() - start:.0f} s): private memory after the first batch "
              f"{', '.join(f'{first[p]:.0f}' for p in first)} MB, growth {', '.join(f'{g:.1f}' for g in growth)} MB")
        del loader


def job_knn(args):
    """util.features.knn_top1 on a memory-mapped bank of random unit-scale features (N x D float32, written once
    to --bank), against the same run's blocked float32 matrix product of the queries with the bank, and
    against a float64 search; the peak memory of the process."""
    import resource
    sys.path.insert(0, ROOT)
    from util.features import BLOCK_ROWS, knn_top1, knn_vote
    n, d, q = args.bank_rows, args.dim, args.queries
    if not os.path.isfile(args.bank):
        rng = np.random.default_rng(0)
        out = np.lib.format.open_memmap(args.bank, "w+", np.float32, (n, d))
        centres = rng.standard_normal((1000, d)).astype(np.float32)
        for s in range(0, n, 100000):
            e = min(n, s + 100000)
            out[s:e] = centres[np.arange(s, e) % 1000] + 2.0 * rng.standard_normal((e - s, d), dtype=np.float32)
        out.flush()
        del out
    bank = np.load(args.bank, mmap_mode="r")
    labels = np.arange(n) % 1000
    rng = np.random.default_rng(1)
    rows = rng.integers(0, n, q)  # queries: noisy copies of bank rows, as validation images of the classes
    test_labels = labels[rows]
    queries = (np.asarray(bank[rows]) + 2.0 * rng.standard_normal((q, d), dtype=np.float32)).astype(np.float32)
    times = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        for s in range(0, n, BLOCK_ROWS):
            queries @ np.asarray(bank[s:s + BLOCK_ROWS]).T
        product = time.perf_counter() - start
        start = time.perf_counter()
        acc = knn_top1(bank, labels, queries, test_labels, 1000, 20, 0.07, chunk=q)
        times.append((time.perf_counter() - start, product))
    ratios = [a / b for a, b in times]
    print(f"k-NN, bank {n} x {d} float32 (memory-mapped), {q} queries, k 20: knn_top1 "
          f"{min(a for a, _ in times):.1f}-{max(a for a, _ in times):.1f} s, the float32 product "
          f"{min(b for _, b in times):.1f}-{max(b for _, b in times):.1f} s; ratio {min(ratios):.2f}-{max(ratios):.2f} "
          f"({', '.join(f'{r:.2f}' for r in ratios)}); top-1 {acc:.2f}%; peak memory "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GB (the bank "
          f"{bank.nbytes / 2 ** 30:.2f} GiB)")
    if args.reference:
        q64 = queries / np.linalg.norm(queries.astype(np.float64), axis=1, keepdims=True)
        best_s, best_i = np.full((q, 20), -np.inf), np.zeros((q, 20), np.int64)
        for s in range(0, n, 20000):
            block = np.asarray(bank[s:s + 20000], np.float64)
            sims = q64 @ (block / np.linalg.norm(block, axis=1, keepdims=True)).T
            top = np.argpartition(-sims, 20, axis=1)[:, :21]  # the block's 21 best (ties at the 20th kept)
            all_s = np.concatenate([best_s, np.take_along_axis(sims, top, 1)], 1)
            all_i = np.concatenate([best_i, top + s], 1)
            order = np.lexsort((all_i, -all_s))[:, :20]
            best_s, best_i = np.take_along_axis(all_s, order, 1), np.take_along_axis(all_i, order, 1)
        ref = 100.0 * (knn_vote(best_s, labels[best_i], 1000, 0.07) == test_labels).mean()
        print(f"  float64 search: top-1 {ref:.2f}% ({'equal' if ref == acc else 'DIFFERENT'})")


def job_extract(args):
    """main_extract.py's peak resident memory (/usr/bin/time) on the first N images of val/ for each --sizes N
    (flat folders of hard links), with a vit_micro_patch4 of random weights: it must not grow with N x D."""
    sys.path.insert(0, ROOT)
    import models_vit
    from util.weights import save_file
    work = os.path.join(os.path.dirname(os.path.abspath(args.bank)), "extract_bench")
    os.makedirs(work, exist_ok=True)
    weights = os.path.join(work, "vit_micro.pd")
    save_file({"model": models_vit.vit_micro_patch4(img_size=32).state_dict()}, weights)
    val = os.path.join(args.root, "val")
    files = [os.path.join(val, c, f) for c in sorted(os.listdir(val)) for f in sorted(os.listdir(os.path.join(val, c)))]
    for n in args.sizes:
        folder = os.path.join(work, f"flat_{n}")
        if not os.path.isdir(folder):
            os.makedirs(folder)
            for i, path in enumerate(files[:n]):
                os.link(path, os.path.join(folder, f"{i:07d}.jpg"))
        out = os.path.join(work, f"features_{n}.npz")
        res = subprocess.run(["/usr/bin/time", "-f", "MAXRSS %M", sys.executable, "main_extract.py", "--model",
                              "vit_micro_patch4", "--finetune", weights, "--device", "cpu", "--num_workers",
                              str(args.num_workers), "--data_path", folder, "--output", out], cwd=ROOT,
                             capture_output=True, text=True)
        peak = re.findall(r"MAXRSS (\d+)", res.stderr)
        shape = np.load(out)["features"].shape if res.returncode == 0 else None
        print(f"main_extract.py, {n} images, features {shape}: peak memory of the main process "
              f"{int(peak[-1]) / 1024:.0f} MB" if peak and shape else f"main_extract.py failed: {res.stderr[-500:]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--make", action="store_true")
    parser.add_argument("--train", type=int, default=1281167)
    parser.add_argument("--val", type=int, default=50000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--job", choices=["index", "loader", "knn", "extract"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 50000], help="--job extract: images")
    parser.add_argument("--bank", default="/tmp/knn_bank.npy", help="--job knn: the bank file (made if missing)")
    parser.add_argument("--bank_rows", type=int, default=1281167)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--reference", action="store_true", help="--job knn: also the float64 search")
    parser.add_argument("--torch_python", default="", help="a Python with torchvision, for the references")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--num_workers", type=int, default=2)
    args = parser.parse_args()
    if args.make:
        make(args.root, args.train, args.val, args.classes)
    if args.job == "index":
        job_index(args)
    elif args.job == "loader":
        job_loader(args)
    elif args.job == "knn":
        job_knn(args)
    elif args.job == "extract":
        job_extract(args)


if __name__ == "__main__":
    main()
