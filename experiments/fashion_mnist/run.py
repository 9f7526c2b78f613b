"""The Fashion-MNIST label-efficiency study: MAE pre-training once on the 60,000 training images without
labels, then with 1%, 10% and 100% of the labels: fine-tuning from MAE vs from scratch, linear probing, and
logistic regression / kNN baselines, all with the project's own scripts.

    python experiments/fashion_mnist/run.py                 # everything (resumes where it stopped)
    python experiments/fashion_mnist/run.py --stages pretrain baselines
    python experiments/fashion_mnist/run.py --smoke --out /tmp/fm_smoke   # a few hundred images, 1 epoch each

Each stage is one script call with a fixed output folder; a stage whose log.txt has all its epochs is
skipped, and an interrupted one continues from its checkpoint (the scripts auto-resume). Writes
results.json (every number with its command, log file and wall clock), results.md, label_efficiency.png,
loss_curves.png and reconstruction.png beside this script; rerunning after the last stage rewrites them
identically.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
# model, image size and budgets of the study (see README.md beside this file)
MAE, VIT, SIZE, BATCH = "mae_vit_micro_patch4", "vit_micro_patch4", 28, 128
PERCENTS = (1, 10, 100)
EPOCHS = {"pretrain": {100: 50}, "finetune": {1: 100, 10: 50, 100: 15}, "linprobe": {1: 100, 10: 50, 100: 15}}
WARMUP = 5
SUBSET_SEED = 0
COMMON = ["--num_workers", "2", "--print_freq", "100", "--input_size", str(SIZE), "--save_freq", "1000"]
FINETUNE = ["--model", VIT, "--blr", "5e-3", "--aa", "none", "--reprob", "0", "--drop_path", "0",
            "--nb_classes", "10"]
METHODS = {"finetune_mae": "fine-tune, MAE encoder", "finetune_scratch": "fine-tune, from scratch",
           "linprobe_mae": "linear probe, MAE encoder", "knn_mae": "kNN, MAE features",
           "logistic_regression_pixels": "logistic regression, raw pixels", "knn_pixels": "kNN, raw pixels"}
BEGIN, END = "<!-- results: written by run.py -->", "<!-- end of results -->"


def label_subset(data, percent, seed=SUBSET_SEED):
    """data/train files of a class-balanced `percent` of each class (at least 2): a prefix of one seeded
    permutation per class, so the 1% subset lies inside the 10% one. Paths relative to data/train."""
    train = os.path.join(data, "train")
    files = []
    for index, c in enumerate(sorted(os.listdir(train))):
        names = sorted(os.listdir(os.path.join(train, c)))
        order = np.random.default_rng([seed, index]).permutation(len(names))
        files += [os.path.join(c, names[i]) for i in sorted(order[:max(2, round(len(names) * percent / 100))])]
    return files


def subset_folder(data, percent):
    """An ImageFolder of the subset (train/) and the whole test set (val/), as hard links (a copy where the
    file system has none); built once, recorded in its subset.txt, which is written last."""
    if percent == 100:
        return data
    folder = f"{data}_labels{percent}pct"
    record = os.path.join(folder, "subset.txt")
    if os.path.isfile(record):
        return folder
    files = [os.path.join("train", f) for f in label_subset(data, percent)]
    files += [os.path.join("val", c, f) for c in sorted(os.listdir(os.path.join(data, "val")))
              for f in sorted(os.listdir(os.path.join(data, "val", c)))]
    for f in files:
        src, dst = os.path.join(data, f), os.path.join(folder, f)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if not os.path.exists(dst):
            try:
                os.link(src, dst)
            except OSError:
                with open(src, "rb") as a, open(dst, "wb") as b:
                    b.write(a.read())
    with open(record, "w", encoding="utf-8") as f:
        f.write("\n".join(p for p in files if p.startswith("train")) + "\n")
    return folder


def stages(data, out, epochs, warmup, batch):
    """name -> (script, flags, epochs, percent). Stage outputs live in out/name."""
    pretrained = os.path.join(out, "pretrain", "checkpoint-last.pd")
    plan = {"pretrain": ("main_pretrain.py", ["--model", MAE, "--norm_pix_loss", "--mask_ratio", "0.75",
                                              "--blr", "2e-3", "--data_path", data], epochs["pretrain"][100], 100)}
    folders = {p: subset_folder(data, p) for p in PERCENTS}
    plan["baselines"] = (os.path.join("experiments", "fashion_mnist", "baselines.py"),
                         ["--train", *[f"{p}={folders[p]}/train" for p in PERCENTS], "--val", f"{data}/val",
                          "--checkpoint", pretrained, "--model", VIT, "--input_size", str(SIZE)], None, None)
    for p in PERCENTS:
        cls = ["--data_path", folders[p], "--warmup_epochs", str(warmup)]
        plan[f"linprobe_mae_{p}"] = ("main_linprobe.py", ["--model", VIT, "--finetune", pretrained, "--blr", "25.6",
                                                          "--nb_classes", "10", *cls], epochs["linprobe"][p], p)
        plan[f"finetune_mae_{p}"] = ("main_finetune.py", [*FINETUNE, "--finetune", pretrained, *cls],
                                     epochs["finetune"][p], p)
        plan[f"finetune_scratch_{p}"] = ("main_finetune.py", [*FINETUNE, *cls], epochs["finetune"][p], p)
    for name, (script, flags, n, p) in plan.items():
        if n is None:
            flags += ["--log", os.path.join(out, name, "log.txt")]
        else:
            flags += ["--output_dir", os.path.join(out, name), "--log_dir", os.path.join(out, name),
                      "--epochs", str(n), "--batch_size", str(batch), *COMMON]
            if name == "pretrain":
                flags += ["--warmup_epochs", str(warmup)]
    return plan


def read_log(folder):
    path = os.path.join(folder, "log.txt")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def wall_clock(folder):
    path = os.path.join(folder, "wall_clock.txt")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return float(f.read())


def finished(name, epochs, out):
    lines = len(read_log(os.path.join(out, name)))
    return lines >= (epochs if epochs is not None else len(PERCENTS) * 3)


def run_stage(name, script, flags, epochs, out):
    if finished(name, epochs, out):
        print(f"[{name}] done already")
        return
    os.makedirs(os.path.join(out, name), exist_ok=True)
    cmd = [sys.executable, os.path.join(ROOT, script), *flags]
    print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
    start = time.time()
    with open(os.path.join(out, f"{name}.stdout"), "a", encoding="utf-8") as log:
        code = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    clock = os.path.join(out, name, "wall_clock.txt")  # seconds, summed over resumed attempts
    spent = wall_clock(os.path.join(out, name)) or 0.0
    with open(clock, "w") as f:
        f.write(f"{spent + time.time() - start:.1f}\n")
    if code != 0:
        sys.exit(f"error: stage {name} failed; see {os.path.join(out, name + '.stdout')}")


def flag(flags, name):
    return flags[flags.index(name) + 1]


def train_images(flags):
    folder = os.path.join(flag(flags, "--data_path"), "train")
    return sum(len(os.listdir(os.path.join(folder, c))) for c in os.listdir(folder))


def collect(plan, out, report):
    """results.json and results.md from the stage logs; the tables also replace the marked block of README.md."""
    stages_, table = {}, {m: {} for m in METHODS}
    for name, (script, flags, epochs, percent) in plan.items():
        logs = read_log(os.path.join(out, name))
        if not finished(name, epochs, out):
            continue
        entry = {"command": " ".join([f"python {script}", *flags]), "log": os.path.join(out, name, "log.txt"),
                 "wall_clock_s": wall_clock(os.path.join(out, name))}
        if epochs is None:
            for row in logs:
                table[row["method"]][int(row["percent"])] = row["test_acc1"]
            entry["rows"] = logs
        else:
            images = train_images(flags)
            entry.update(epochs=len(logs), train_images=images, optimizer_steps=len(logs) * (images // int(flag(flags, "--batch_size"))),
                         final_train_loss=logs[-1]["train_loss"])
            if "test_acc1" in logs[-1]:
                entry.update(final_acc1=logs[-1]["test_acc1"], best_acc1=max(r["test_acc1"] for r in logs))
                table[name.rsplit("_", 1)[0]][percent] = logs[-1]["test_acc1"]
        stages_[name] = entry
    gains = {p: table["finetune_mae"][p] - table["finetune_scratch"][p] for p in PERCENTS
             if p in table["finetune_mae"] and p in table["finetune_scratch"]}
    with open(os.path.join(report, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"test_top1": {m: {str(p): a for p, a in sorted(v.items())} for m, v in table.items()},
                   "finetune_mae_minus_scratch": {str(p): g for p, g in gains.items()}, "stages": stages_},
                  f, indent=1)
    rows = ["| test top-1 (%) | " + " | ".join(f"{p}% labels" for p in PERCENTS) + " |",
            "|---" * (len(PERCENTS) + 1) + "|"]
    for m, label in METHODS.items():
        rows.append(f"| {label} | " + " | ".join(f"{table[m][p]:.2f}" if p in table[m] else "–" for p in PERCENTS)
                    + " |")
    rows.append("| fine-tune: MAE minus scratch | " + " | ".join(f"{gains[p]:+.2f}" if p in gains else "–"
                                                                  for p in PERCENTS) + " |")
    rows += ["", "| stage | train images | epochs | optimizer steps | final train loss | top-1 (final) | "
             "top-1 (best) | wall clock |", "|---|---|---|---|---|---|---|---|"]
    for name, e in stages_.items():
        clock = "–" if e["wall_clock_s"] is None else f"{e['wall_clock_s'] / 60:.1f} min"
        if "epochs" not in e:
            rows.append(f"| {name} | | | | | | | {clock} |")
            continue
        acc = f"{e['final_acc1']:.2f} | {e['best_acc1']:.2f}" if "final_acc1" in e else "– | –"
        rows.append(f"| {name} | {e['train_images']} | {e['epochs']} | {e['optimizer_steps']} | "
                    f"{e['final_train_loss']:.4f} | {acc} | {clock} |")
    total = sum(e["wall_clock_s"] or 0.0 for e in stages_.values())
    rows += ["", f"Total wall clock of the stages: {total / 60:.0f} min."]
    text = "\n".join(rows) + "\n"
    with open(os.path.join(report, "results.md"), "w", encoding="utf-8") as f:
        f.write(text)
    readme = os.path.join(report, "README.md")
    if os.path.isfile(readme):
        with open(readme, encoding="utf-8") as f:
            old = f.read()
        head, sep, rest = old.partition(BEGIN)
        if sep and END in rest:
            with open(readme, "w", encoding="utf-8") as f:
                f.write(head + BEGIN + "\n" + text + END + rest.split(END, 1)[1])
    return table


def plots(plan, table, data, out, report):
    """label_efficiency.png, loss_curves.png and reconstruction.png."""
    import matplotlib
    matplotlib.use("Agg")
    matplotlib.rcParams["svg.hashsalt"] = "fashion_mnist"
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for m, label in METHODS.items():
        points = sorted(table[m].items())
        if points:
            ax.plot(*zip(*points), "o-" if m.startswith(("finetune", "linprobe")) or m == "knn_mae" else "s--",
                    label=label)
    ax.set(xscale="log", xticks=PERCENTS, xticklabels=[f"{p}%" for p in PERCENTS], xlabel="labelled training images",
           ylabel="test top-1 (%)", title="Fashion-MNIST: top-1 vs fraction of labels")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(report, "label_efficiency.png"), dpi=100, metadata={"Software": None})
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for name in plan:
        logs = read_log(os.path.join(out, name))
        if not logs or "epoch" not in logs[0]:
            continue
        epoch = [r["epoch"] + 1 for r in logs]
        if name == "pretrain":
            ax[0].plot(epoch, [r["train_loss"] for r in logs], ".-")
        elif name.endswith("_100"):
            ax[1].plot(epoch, [r["test_acc1"] for r in logs], ".-", label=name)
    ax[0].set(title="MAE pre-training loss (norm-pix), 60,000 images", xlabel="epoch")
    ax[1].set(title="test top-1 (%) per epoch, 100% labels", xlabel="epoch")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(report, "loss_curves.png"), dpi=100, metadata={"Software": None})
    ckpt = os.path.join(out, "pretrain", "checkpoint-last.pd")
    if not os.path.isfile(ckpt):
        return
    classes = sorted(os.listdir(os.path.join(data, "val")))
    imgs = [os.path.join(data, "val", c, min(os.listdir(os.path.join(data, "val", c)))) for c in classes[::3]]
    if subprocess.call([sys.executable, os.path.join(ROOT, "main_visualize.py"), "--model", MAE, "--resume", ckpt,
                        "--norm_pix_loss", "--scale", "6", "--output", os.path.join(report, "reconstruction.png"),
                        "--img_path", *imgs], cwd=ROOT, stdout=subprocess.DEVNULL) != 0:
        sys.exit("error: main_visualize.py failed to draw reconstruction.png (its message is above)")


def _from_root(path):
    """`path` relative to the repository root when it lies inside it, else absolute."""
    path = os.path.abspath(path)
    return os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="ImageFolder root, made from the IDX files when it has no "
                        "train/ (default: data/fashion_mnist, data/fashion_mnist_smoke with --smoke)")
    parser.add_argument("--out", default=os.path.join(ROOT, "output_dir", "fashion_mnist"), help="stage outputs")
    parser.add_argument("--report", default=None, help="results.json, results.md and the PNGs "
                        "(default: this folder; --out with --smoke)")
    parser.add_argument("--stages", nargs="*", default=None, help="default: all, in order")
    parser.add_argument("--smoke", action="store_true", help="30 train / 10 val images per class, 1 epoch each")
    args = parser.parse_args(argv)
    # paths relative to the repository, so that the recorded commands run from its root
    default_data = os.path.join(ROOT, "data", "fashion_mnist_smoke" if args.smoke else "fashion_mnist")
    data, out = (_from_root(p) for p in (args.data or default_data, args.out))
    report = os.path.abspath(args.report or (args.out if args.smoke else HERE))
    os.chdir(ROOT)
    epochs, warmup, batch = EPOCHS, WARMUP, BATCH
    if args.smoke:
        warmup, batch = 0, 16
        epochs = {kind: {p: 1 for p in v} for kind, v in EPOCHS.items()}
    prep = [] if not args.smoke else ["--train_per_class", "30", "--val_per_class", "10"]
    prepare = [sys.executable, os.path.join(ROOT, "demo", "prepare_fashion_mnist.py"), "--out", data, *prep]
    if not os.path.isdir(os.path.join(data, "train")) and subprocess.call(prepare) != 0:
        sys.exit(f"error: could not prepare --data {data} (the message above says why)")
    for flag, folder in (("--out", out), ("--report", report)):
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            sys.exit(f"error: {flag} {folder}: {e.strerror}")
    plan = stages(data, out, epochs, warmup, batch)
    unknown = [s for s in args.stages or [] if s not in plan]
    if unknown:
        parser.error(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(plan)}")
    for name in args.stages or plan:
        script, flags, n, _ = plan[name]
        run_stage(name, script, flags, n, out)
    table = collect(plan, out, report)
    plots(plan, table, data, out, report)
    with open(os.path.join(report, "results.md"), encoding="utf-8") as f:
        print(f.read())
    print(f"wrote {report}/results.json, results.md, label_efficiency.png, loss_curves.png, reconstruction.png")


if __name__ == "__main__":
    main()
