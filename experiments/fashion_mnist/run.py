"""The Fashion-MNIST study: MAE pre-training, linear probing and fine-tuning against baselines, and a
mask-ratio ablation, all with the project's own scripts.

    python experiments/fashion_mnist/run.py                 # everything (resumes where it stopped)
    python experiments/fashion_mnist/run.py --stages pretrain_0.75 linprobe_0.75
    python experiments/fashion_mnist/run.py --smoke --out /tmp/fm_smoke   # a few hundred images, 1 epoch each

Each stage is one script call with a fixed output folder; a stage whose log.txt has all its epochs is
skipped, and an interrupted one continues from its checkpoint (the scripts auto-resume). Writes
results.json (every number with its command, log file and wall clock), results.md, loss_curves.png and
reconstruction.png beside this script (--report).
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
MASK_RATIOS = (0.25, 0.5, 0.75, 0.9)
# model, image size and budgets of the study (see README.md beside this file)
MAE, VIT, SIZE = "mae_vit_micro_patch4", "vit_micro_patch4", 28
EPOCHS = {"pretrain": 6, "linprobe": 4, "finetune": 5}  # about 1 h 50 min in all on 2 cores
COMMON = ["--batch_size", "128", "--num_workers", "2", "--print_freq", "100", "--input_size", str(SIZE),
          "--save_freq", "1000"]
CLS = ["--nb_classes", "10", "--warmup_epochs", "1"]
BEGIN, END = "<!-- results: written by run.py -->", "<!-- end of results -->"


def stages(data, out, epochs):
    """name -> (script, flags, epochs). Stage outputs live in out/name."""
    pretrained = {r: os.path.join(out, f"pretrain_{r}", "checkpoint-last.pd") for r in MASK_RATIOS}
    plan = {}
    warmup = str(min(2, epochs["pretrain"]))
    for r in MASK_RATIOS:
        plan[f"pretrain_{r}"] = ("main_pretrain.py", ["--model", MAE, "--norm_pix_loss", "--mask_ratio", str(r),
                                                      "--blr", "2e-3", "--warmup_epochs", warmup], "pretrain")
        plan[f"linprobe_{r}"] = ("main_linprobe.py", ["--model", VIT, "--finetune", pretrained[r], "--blr", "25.6",
                                                      *CLS], "linprobe")
    plan["finetune_0.75"] = ("main_finetune.py", ["--model", VIT, "--finetune", pretrained[0.75], "--blr", "5e-3",
                                                  "--aa", "none", "--reprob", "0", "--drop_path", "0", *CLS],
                             "finetune")
    plan["linprobe_random_init"] = ("main_linprobe.py", ["--model", VIT, "--blr", "25.6", *CLS], "linprobe")
    plan["finetune_from_scratch"] = ("main_finetune.py", ["--model", VIT, "--blr", "5e-3", "--aa", "none",
                                                          "--reprob", "0", "--drop_path", "0", *CLS], "finetune")
    return {name: (script, flags + ["--data_path", data, "--output_dir", os.path.join(out, name),
                                    "--log_dir", os.path.join(out, name)], kind)
            for name, (script, flags, kind) in plan.items()}


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


def run_stage(name, script, flags, epochs, out):
    if len(read_log(os.path.join(out, name))) >= epochs:
        print(f"[{name}] done already")
        return
    cmd = [sys.executable, os.path.join(ROOT, script), *flags, "--epochs", str(epochs), *COMMON]
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


def collect(plan, epochs, out, report):
    """results.json and results.md from the stage logs; the table also replaces the marked block of README.md."""
    results = {}
    for name, (script, flags, kind) in plan.items():
        logs = read_log(os.path.join(out, name))
        if not logs:
            continue
        entry = {"command": " ".join([f"python {script}", *flags, "--epochs", str(epochs[kind]), *COMMON]),
                 "log": os.path.join(out, name, "log.txt"), "epochs": len(logs),
                 "final_train_loss": logs[-1]["train_loss"], "wall_clock_s": wall_clock(os.path.join(out, name))}
        if "test_acc1" in logs[-1]:
            entry.update(final_acc1=logs[-1]["test_acc1"], best_acc1=max(r["test_acc1"] for r in logs))
        results[name] = entry
    pairs = {"linear probe": ("linprobe_0.75", "linprobe_random_init"),
             "fine-tune": ("finetune_0.75", "finetune_from_scratch")}
    comparisons = {what: {"mae": results[a]["final_acc1"], "baseline": results[b]["final_acc1"],
                          "difference": results[a]["final_acc1"] - results[b]["final_acc1"]}
                   for what, (a, b) in pairs.items() if a in results and b in results}
    with open(os.path.join(report, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"stages": results, "comparisons": comparisons}, f, indent=1)
    rows = ["| stage | epochs | final train loss | top-1 (final) | top-1 (best) | wall clock |",
            "|---|---|---|---|---|---|"]
    for name, e in results.items():
        acc = (f"{e['final_acc1']:.2f} | {e['best_acc1']:.2f}" if "final_acc1" in e else "– | –")
        clock = "–" if e["wall_clock_s"] is None else f"{e['wall_clock_s'] / 60:.1f} min"
        rows.append(f"| {name} | {e['epochs']} | {e['final_train_loss']:.4f} | {acc} | {clock} |")
    rows += ["", "| top-1 (final epoch) | MAE pre-trained (mask 0.75) | baseline | difference |", "|---|---|---|---|"]
    rows += [f"| {what} | {c['mae']:.2f} | {c['baseline']:.2f} | {c['difference']:+.2f} |"
             for what, c in comparisons.items()]
    total = sum(e["wall_clock_s"] or 0.0 for e in results.values())
    rows += ["", f"Total wall clock of the stages: {total / 60:.0f} min."]
    table = "\n".join(rows) + "\n"
    with open(os.path.join(report, "results.md"), "w", encoding="utf-8") as f:
        f.write(table)
    readme = os.path.join(report, "README.md")
    if os.path.isfile(readme):
        with open(readme, encoding="utf-8") as f:
            text = f.read()
        head, sep, rest = text.partition(BEGIN)
        if sep and END in rest:
            with open(readme, "w", encoding="utf-8") as f:
                f.write(head + BEGIN + "\n" + table + END + rest.split(END, 1)[1])
    return results


def plots(plan, data, out, report):
    """loss_curves.png (losses and validation top-1 per epoch, mask-ratio ablation) and reconstruction.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(2, 2, figsize=(10, 8))
    ablation = []
    for name in plan:
        logs = read_log(os.path.join(out, name))
        if not logs:
            continue
        epoch = [r["epoch"] + 1 for r in logs]
        if name.startswith("pretrain"):
            ax[0, 0].plot(epoch, [r["train_loss"] for r in logs], ".-", label=name)
            continue
        ax[0, 1].plot(epoch, [r["train_loss"] for r in logs], ".-", label=name)
        ax[1, 0].plot(epoch, [r["test_acc1"] for r in logs], ".-", label=name)
        ratio = name.split("_")[-1]
        if name.startswith("linprobe") and ratio[0].isdigit():
            ablation.append((float(ratio), logs[-1]["test_acc1"]))
    if ablation:
        ax[1, 1].plot(*zip(*sorted(ablation)), marker="o")
    titles = ("pre-training loss (norm-pix)", "classification training loss", "validation top-1 (%)",
              "linear probe top-1 (%) vs mask ratio")
    for a, title in zip(ax.flat, titles):
        a.set_title(title)
        a.set_xlabel("mask ratio" if a is ax[1, 1] else "epoch")
        if a is not ax[1, 1]:
            a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(report, "loss_curves.png"), dpi=100)
    ckpt = os.path.join(out, "pretrain_0.75", "checkpoint-last.pd")
    if not os.path.isfile(ckpt):
        return
    imgs = [os.path.join(data, "val", c, min(os.listdir(os.path.join(data, "val", c))))
            for c in sorted(os.listdir(os.path.join(data, "val")))[:4]]
    if subprocess.call([sys.executable, os.path.join(ROOT, "main_visualize.py"), "--model", MAE, "--resume", ckpt,
                        "--output", os.path.join(report, "reconstruction.png"), "--img_path", *imgs],
                       cwd=ROOT, stdout=subprocess.DEVNULL) != 0:
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
    parser.add_argument("--report", default=None,
                        help="results.json, results.md and the PNGs (default: this folder; --out with --smoke)")
    parser.add_argument("--stages", nargs="*", default=None, help="default: all, in order")
    parser.add_argument("--smoke", action="store_true", help="30 train / 10 val images per class, 1 epoch each")
    args = parser.parse_args(argv)
    # paths relative to the repository, so that the recorded commands run from its root
    default_data = os.path.join(ROOT, "data", "fashion_mnist_smoke" if args.smoke else "fashion_mnist")
    data, out = (_from_root(p) for p in (args.data or default_data, args.out))
    report = os.path.abspath(args.report or (args.out if args.smoke else HERE))
    os.chdir(ROOT)
    epochs = dict(EPOCHS)
    if args.smoke:
        epochs = {k: 1 for k in epochs}
    prep = [] if not args.smoke else ["--train_per_class", "30", "--val_per_class", "10"]
    prepare = [sys.executable, os.path.join(ROOT, "demo", "prepare_fashion_mnist.py"), "--out", data, *prep]
    if not os.path.isdir(os.path.join(data, "train")) and subprocess.call(prepare) != 0:
        sys.exit(f"error: could not prepare --data {data} (the message above says why)")
    for flag, folder in (("--out", out), ("--report", report)):
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            sys.exit(f"error: {flag} {folder}: {e.strerror}")
    plan = stages(data, out, epochs)
    unknown = [s for s in args.stages or [] if s not in plan]
    if unknown:
        parser.error(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(plan)}")
    for name in args.stages or plan:
        script, flags, kind = plan[name]
        run_stage(name, script, flags, epochs[kind], out)
    results = collect(plan, epochs, out, report)
    plots(plan, data, out, report)
    with open(os.path.join(report, "results.md"), encoding="utf-8") as f:
        print(f.read())
    print(f"wrote {report}/results.json, results.md, loss_curves.png, reconstruction.png ({len(results)} stages)")


if __name__ == "__main__":
    main()
