"""The Fashion-MNIST label-efficiency study: MAE pre-training on the training images without labels, then
1%, 10% and 100% of the labels for MAE fine-tuning, fine-tuning from scratch, the linear probe, logistic
regression and kNN on pixels and on MAE features, and a small CNN; every choice made on a validation
split held out from the training images, the test set used once per reported number.

    python experiments/fashion_mnist/run.py                 # everything (resumes where it stopped)
    python experiments/fashion_mnist/run.py --stages pretrain sweep
    python experiments/fashion_mnist/run.py --smoke --out /tmp/fm_smoke   # a few hundred images, 1 epoch each

Each training run is one script call with a fixed output folder; a run whose log.txt has all its epochs is
skipped, and an interrupted one continues from its checkpoint (the scripts auto-resume). Writes
results.json, results.md and the pictures beside this script; rerunning after the last stage rewrites them
identically.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

from grids import EXTEND, beyond_edge  # noqa: E402
from splits import VAL_PER_CLASS, development_folder, label_subset_folder  # noqa: E402

MAE, VIT, SIZE = "mae_vit_micro_patch4", "vit_micro_patch4", 28
PERCENTS = (1, 10, 100)
GROUPS = ("pretrain", "sweep", "draws", "full", "baselines", "curve", "pictures", "recipe", "pretrain_seeds")
FULL = {"val_per_class": VAL_PER_CLASS, "draws": (0, 1, 2), "main_pretrain": 50,
        "pretrain_epochs": (10, 25, 50, 100), "pixel_epochs": 25,
        "lbfgs_iterations": 5000, "extend": EXTEND,
        "epochs": {1: 100, 10: 50, 100: 15}, "eval_freq": {1: 10, 10: 5, 100: 5}, "batch": 128,
        "scratch_longer": {1: 4, 10: 2, 100: 2},
        "grids": {"finetune_mae": ("2.5e-3", "5e-3", "1e-2"), "finetune_scratch": ("2.5e-3", "5e-3", "1e-2"),
                  "linprobe_mae": ("0.1", "0.8", "6.4", "25.6")},
        "recipe_steps": ({"crop_pct": ("0.875", "1"), "crop_min": ("0.08", "0.25", "0.5")},
                         {"drop_path": ("0", "0.1", "0.2"), "weight_decay": ("0.05", "0.2")}, {"longer": ("1", "2")}),
        "pretrain_seeds": (0, 1)}
SMOKE = dict(FULL, val_per_class=5, draws=(0, 1), main_pretrain=1, pretrain_epochs=(1, 2),
             pixel_epochs=1, batch=16, lbfgs_iterations=50, extend=1,
             epochs={p: 1 for p in PERCENTS}, eval_freq={p: 1 for p in PERCENTS}, scratch_longer={p: 2 for p in PERCENTS},
             grids={m: g[:2] if m == "finetune_mae" else g[:1] for m, g in FULL["grids"].items()},
             recipe_steps=({"crop_pct": ("0.875", "1")}, {"drop_path": ("0", "0.1")}, {"longer": ("1", "2")}))
COMMON = ["--num_workers", "2", "--print_freq", "100", "--input_size", str(SIZE), "--save_freq", "1000"]
PRETRAIN = ["main_pretrain.py", "--model", MAE, "--mask_ratio", "0.75", "--blr", "2e-3"]
SCRIPTED = {"finetune_mae": ["main_finetune.py", "--model", VIT, "--aa", "none", "--reprob", "0", "--drop_path", "0",
                             "--nb_classes", "10"],
            "linprobe_mae": ["main_linprobe.py", "--model", VIT, "--nb_classes", "10"]}
SCRIPTED["finetune_scratch"] = [*SCRIPTED["finetune_mae"], "--layer_decay", "1.0"]
METHODS = {"finetune_mae": "fine-tune, MAE encoder", "finetune_scratch": "fine-tune, from scratch",
           "linprobe_mae": "linear probe, MAE encoder", "logreg_mae": "logistic regression, MAE features",
           "knn_mae": "kNN, MAE features", "logreg_pixels": "logistic regression, raw pixels",
           "knn_pixels": "kNN, raw pixels", "cnn": "small CNN, from scratch"}
TICK = 10  # seconds between the updates of a running wall_clock.txt
BEGIN, END = "<!-- results: written by run.py -->", "<!-- end of results -->"


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


def timed_call(cmd, folder, stdout):
    """Run cmd from the repository root, console appended to `stdout`; add its seconds to folder's
    wall_clock.txt (summed over resumed attempts, rewritten every TICK seconds so that an attempt killed with
    the session still counts); exit naming the file on failure. The clock advances at most 2 * TICK per tick,
    so time the study spends stopped (SIGSTOP, e.g. while the machine measures something else) is not
    counted."""
    os.makedirs(folder, exist_ok=True)
    print(f"[{os.path.basename(folder)}] {' '.join(cmd[1:])}", flush=True)
    spent, last = wall_clock(folder) or 0.0, time.monotonic()
    with open(stdout, "a", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        code = None
        while code is None:
            try:
                code = proc.wait(timeout=TICK)
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            spent, last = spent + min(now - last, 2 * TICK), now
            with open(os.path.join(folder, "wall_clock.txt.tmp"), "w") as f:
                f.write(f"{spent:.1f}\n")
            os.replace(os.path.join(folder, "wall_clock.txt.tmp"), os.path.join(folder, "wall_clock.txt"))
    if code != 0:
        sys.exit(f"error: {os.path.basename(folder)} failed; see {stdout}")


def blr_string(value):
    """A swept value as the run names spell it: 2e-2, 1.25e-3, 102.4."""
    if value >= 0.1:
        return f"{value:.4g}"
    mantissa, exponent = f"{value:.3e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


class Study:
    """The study's runs, each a script call with its output folder out/NAME."""

    def __init__(self, data, out, config):
        self.data, self.out, self.c = data, out, config
        self.dev = development_folder(data, config["val_per_class"])
        self.subsets = {(p, d): label_subset_folder(self.dev, p, d) for p in PERCENTS if p != 100
                        for d in config["draws"]}
        self.subsets[(100, 0)] = self.dev
        self.main_pretrain = config["main_pretrain"]  # the pre-training every classifier starts from
        self.runs = {}  # name -> (flags, epochs, percent)

    def folder(self, name):
        return os.path.join(self.out, name)

    def checkpoint(self, name):
        return os.path.join(self.folder(name), "checkpoint-last.pd")

    def weights(self, name):
        """The model weights of a finished pre-training (no optimizer state): what later stages start from,
        kept with the logs."""
        return os.path.join(self.folder(name), "model.pd")

    def pretrain(self, epochs, pixels=False, seed=0):
        name = (f"pretrain_pixels_e{epochs}" if pixels else f"pretrain_e{epochs}") + (f"_seed{seed}" if seed else "")
        flags = [*PRETRAIN, *([] if pixels else ["--norm_pix_loss"]), "--data_path", self.dev,
                 "--warmup_epochs", str(epochs // 10), *(["--seed", str(seed)] if seed else [])]
        self.train(name, flags, epochs, 100)
        if not os.path.isfile(self.weights(name)):
            convert = [sys.executable, "-m", "util.convert_weights", self.checkpoint(name), self.weights(name)]
            if subprocess.call(convert, cwd=ROOT) != 0:
                sys.exit(f"error: could not write {self.weights(name)} (the message above says why)")
        return name

    def epochs(self, method, percent):
        """MAE fine-tuning and the probe train c["epochs"]; from scratch, with no pre-training to start from,
        c["scratch_longer"] times as many."""
        return self.c["epochs"][percent] * (self.c["scratch_longer"][percent] if method == "finetune_scratch" else 1)

    def classify(self, method, percent, draw, blr, pretrain=None):
        """A fine-tuning or linear-probe run on a label subset, validated on the validation split."""
        longer = self.epochs(method, percent) // self.c["epochs"][percent]
        pretrain = pretrain or self.main_pretrain
        name = f"{method}_{percent}pct_draw{draw}_blr{blr}" + ("" if pretrain == self.main_pretrain
                                                                else f"_pretrain{pretrain}")
        flags = [*SCRIPTED[method], "--blr", blr, "--data_path", self.subsets[(percent, draw)], "--seed", str(draw),
                 "--warmup_epochs", str(min(5, self.c["epochs"][percent])),
                 "--eval_freq", str(self.c["eval_freq"][percent] * longer)]
        if method != "finetune_scratch":
            flags += ["--finetune", self.weights(f"pretrain_e{pretrain}")]
        return self.train(name, flags, self.epochs(method, percent), percent)

    def recipe_run(self, method, percent, recipe):
        """A validation run (draw 0) of `method` with the small-image recipe `recipe` (crop_pct, crop_min,
        drop_path, weight_decay, longer: a multiple of the method's epochs, blr); its name spells the recipe
        (the multiple only when it is not 1)."""
        longer = int(recipe["longer"])
        name = (f"recipe_{method}_{percent}pct_draw0_crop{recipe['crop_min']}_eval{recipe['crop_pct']}"
                f"_dp{recipe['drop_path']}_wd{recipe['weight_decay']}" + ("" if longer == 1 else f"_x{longer}")
                + f"_blr{recipe['blr']}")
        epochs = self.epochs(method, percent) * longer
        flags = [*SCRIPTED[method], "--blr", recipe["blr"], "--data_path", self.subsets[(percent, 0)], "--seed", "0",
                 "--warmup_epochs", str(min(5, self.c["epochs"][percent])),
                 "--eval_freq", str(self.c["eval_freq"][percent] * epochs // self.c["epochs"][percent]),
                 "--crop_scale", recipe["crop_min"], "1", "--crop_pct", recipe["crop_pct"], "--drop_path",
                 recipe["drop_path"], "--weight_decay", recipe["weight_decay"]]
        if method != "finetune_scratch":
            flags += ["--finetune", self.weights(f"pretrain_e{self.main_pretrain}")]
        return self.train(name, flags, epochs, percent)

    def recipe(self, method, percent=10):
        """The small-image recipe of `method`, chosen on validation one step at a time (each step's grid over
        its keys, the others at the best so far), then blr around the earlier sweep's choice, continued past
        an end that holds the best as the sweeps are. Returns (chosen recipe, {run name: val top-1})."""
        best = {"crop_pct": "0.875", "crop_min": "0.08", "drop_path": "0", "weight_decay": "0.05",
                "longer": "1", "blr": self.chosen(method, percent)}
        scores = {}

        def evaluate(candidate):
            name = self.recipe_run(method, percent, candidate)
            scores[name] = self.val_acc(name)
            return scores[name]

        for step in self.c["recipe_steps"]:
            keys = list(step)
            grid = [dict(best)]
            for key in keys:
                grid = [{**g, key: v} for g in grid for v in step[key]]
            best = max(grid, key=lambda g: (evaluate(g), -grid.index(g)))
        centre = float(best["blr"])
        values = [centre / 2, centre, centre * 2]
        for _ in range(self.c["extend"] + 1):
            accs = [evaluate({**best, "blr": blr_string(v)}) for v in values]
            value = beyond_edge(values, accs)
            if value is None:
                break
            values.append(value)
        best["blr"] = blr_string(max(values, key=lambda v: (evaluate({**best, "blr": blr_string(v)}), -v)))
        return best, scores

    def train(self, name, flags, epochs, percent):
        flags = [*flags, "--output_dir", self.folder(name), "--log_dir", self.folder(name), "--epochs", str(epochs),
                 "--batch_size", str(self.c["batch"]), *COMMON]
        self.runs[name] = (flags, epochs, percent)
        if len(read_log(self.folder(name))) < epochs:
            timed_call([sys.executable, flags[0], *flags[1:]], self.folder(name), self.folder(name) + ".stdout")
        else:
            print(f"[{name}] done already", flush=True)
        return name

    def test(self, name):
        """Top-1 on the test set of run `name`'s last checkpoint, measured once and kept in NAME/test.txt."""
        path = os.path.join(self.folder(name), "test.txt")
        found = re.findall(r"\* Acc@1 ([\d.]+)", open(path).read()) if os.path.isfile(path) else []
        if not found:
            if not os.path.isfile(self.checkpoint(name)):
                sys.exit(f"error: {self.checkpoint(name)} is missing, so {name} cannot be tested; delete "
                         f"{self.folder(name)} to train it again")
            flags = self.runs[name][0]
            script, model = flags[:3:2]
            crop = ["--crop_pct", flags[flags.index("--crop_pct") + 1]] if "--crop_pct" in flags else []
            timed_call([sys.executable, script, "--model", model, "--eval", "--resume", self.checkpoint(name), *crop,
                        "--nb_classes", "10", "--data_path", self.data, "--batch_size", "256", "--num_workers", "2",
                        "--input_size", str(SIZE), "--output_dir", "", "--log_dir", ""],
                       os.path.join(self.folder(name), "test"), path)
            found = re.findall(r"\* Acc@1 ([\d.]+)", open(path).read())
        return float(found[-1])

    def val_acc(self, name):
        return read_log(self.folder(name))[-1]["test_acc1"]  # the scripts' "test" set is the validation split

    def finished(self, method, percent, blr):
        """Whether the draw-0 run of `method` at `percent` with `blr` has all its epochs."""
        name = f"{method}_{percent}pct_draw0_blr{blr}"
        return len(read_log(self.folder(name))) >= self.epochs(method, percent)

    def grid(self, method, percent):
        """The values swept for `method` at `percent` (draw 0), as far as its runs have finished: the stated
        grid, continued past the edge that holds the best validation top-1, by up to c["extend"] values (in the
        order they were added)."""
        grid = list(self.c["grids"][method])
        for _ in range(self.c["extend"]):
            names = {blr: f"{method}_{percent}pct_draw0_blr{blr}" for blr in grid}
            if not all(self.finished(method, percent, blr) for blr in grid):
                break
            value = beyond_edge([float(blr) for blr in grid], [self.val_acc(n) for n in names.values()])
            if value is None:
                break
            grid.append(blr_string(value))
        return grid

    def chosen(self, method, percent):
        """The swept value with the best last-epoch validation top-1 of draw 0 (100%: the 10% choice)."""
        percent = 10 if percent == 100 else percent
        names = {blr: f"{method}_{percent}pct_draw0_blr{blr}" for blr in self.grid(method, percent)}
        missing = [n for blr, n in names.items() if not self.finished(method, percent, blr)]
        if missing:
            sys.exit(f"error: the sweep is not finished ({', '.join(missing)}); run --stages sweep first")
        return max(names, key=lambda blr: self.val_acc(names[blr]))

    def stage(self, group):
        c = self.c
        if group == "pretrain":
            self.pretrain(self.main_pretrain)
        elif group == "sweep":
            for percent in (1, 10):
                for method in c["grids"]:
                    swept = []
                    while len(swept) < len(self.grid(method, percent)):
                        blr = next(b for b in self.grid(method, percent) if b not in swept)
                        self.classify(method, percent, 0, blr)
                        swept.append(blr)
                    self.test(self.classify(method, percent, 0, self.chosen(method, percent)))
        elif group in ("draws", "full"):
            for method in c["grids"]:
                for percent, draw in ([(p, d) for p in (1, 10) for d in c["draws"]] if group == "draws"
                                      else [(100, 0)]):
                    self.test(self.classify(method, percent, draw, self.chosen(method, percent)))
        elif group == "baselines":
            train = [f"{p}:{d}={folder}/train" for (p, d), folder in sorted(self.subsets.items())]
            flags = [os.path.join("experiments", "fashion_mnist", "baselines.py"), "--train", *train, "--val",
                     f"{self.dev}/val", "--test", f"{self.data}/val", "--checkpoint",
                     self.weights(f"pretrain_e{self.main_pretrain}"), "--model", VIT, "--input_size", str(SIZE),
                     "--epochs", *[f"{p}={self.epochs('finetune_scratch', p)}" for p in PERCENTS],
                     "--max_iter", str(c["lbfgs_iterations"]),
                     "--log", os.path.join(self.folder("baselines"), "log.txt")]
            self.runs["baselines"] = (flags, None, None)
            if len(read_log(self.folder("baselines"))) < len(self.subsets) * 5:
                timed_call([sys.executable, *flags], self.folder("baselines"), self.folder("baselines") + ".stdout")
        elif group == "curve":
            blr = self.chosen("finetune_mae", 10)
            for epochs in c["pretrain_epochs"]:
                self.pretrain(epochs)
                self.test(self.classify("finetune_mae", 10, 0, blr, pretrain=epochs))
        elif group == "pictures":
            self.pretrain(c["pixel_epochs"], pixels=True)
        elif group == "recipe":
            for method in ("finetune_mae", "finetune_scratch"):
                self.recipe(method)
        elif group == "pretrain_seeds":
            for seed in c["pretrain_seeds"]:
                self.pretrain(self.main_pretrain, seed=seed)


def summary(study):
    """{method: {percent: {mean, std, runs, values}}} of the test top-1 of every reported run."""
    table = {m: {} for m in METHODS}
    for method in study.c["grids"]:
        for percent in PERCENTS:
            blr = study.chosen(method, percent)
            draws = study.c["draws"] if percent != 100 else (0,)
            names = [f"{method}_{percent}pct_draw{d}_blr{blr}" for d in draws]
            if all(os.path.isfile(os.path.join(study.folder(n), "test.txt")) for n in names):
                table[method][percent] = [study.test(n) for n in names]
    for row in read_log(study.folder("baselines")):
        table[row["method"]].setdefault(int(row["percent"]), []).append(row["test_acc1"])
    return {m: {p: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else None,
                    "runs": len(v), "values": v} for p, v in sorted(t.items())} for m, t in table.items()}


def collect(study, report):
    """results.json and results.md from the logs; the tables also replace the marked block of README.md."""
    c = study.c
    stats = summary(study)
    chosen = {m: {p: study.chosen(m, p) for p in (1, 10)} for m in c["grids"]}
    sweeps = {m: {p: {blr: study.val_acc(f"{m}_{p}pct_draw0_blr{blr}") for blr in study.grid(m, p)}
                  for p in (1, 10)} for m in c["grids"]}
    curve = {}
    for epochs in c["pretrain_epochs"]:
        name = study.classify("finetune_mae", 10, 0, chosen["finetune_mae"][10], pretrain=epochs)
        if os.path.isfile(os.path.join(study.folder(name), "test.txt")):
            curve[str(epochs)] = study.test(name)
    runs = {}
    for name, (flags, epochs, percent) in study.runs.items():
        logs = read_log(study.folder(name))
        shipped = [os.path.join(study.folder(name), f) for f in ("log.txt", "test.txt")]
        entry = {"command": " ".join(["python", *flags]),
                 "logs": [os.path.relpath(p, report) for p in shipped if os.path.isfile(p)],
                 "wall_clock_s": wall_clock(study.folder(name))}
        if epochs is not None and logs:
            images = sum(len(os.listdir(os.path.join(flags[flags.index("--data_path") + 1], "train", k)))
                         for k in os.listdir(os.path.join(flags[flags.index("--data_path") + 1], "train")))
            entry.update(epochs=len(logs), train_images=images, optimizer_steps=len(logs) * (images // c["batch"]),
                         final_train_loss=logs[-1]["train_loss"])
            if "test_acc1" in logs[-1]:
                entry["val_acc1"] = logs[-1]["test_acc1"]
            if os.path.isfile(os.path.join(study.folder(name), "test.txt")):
                entry["test_acc1"] = study.test(name)
        runs[name] = entry
    baselines = read_log(study.folder("baselines"))
    protocol = {"selection": "val", "validation": f"{c['val_per_class']} images per class held out from the "
                "training images, never trained on", "main_pretrain_epochs": c["main_pretrain"],
                "test": "the 10,000 test images, evaluated once per reported "
                "run with its chosen setting", "draws": list(c["draws"]), "epochs": {str(p): n for p, n in
                                                                                    c["epochs"].items()},
                "scratch_and_cnn_epochs": {str(p): study.epochs("finetune_scratch", p) for p in PERCENTS},
                "grids": {m: list(g) for m, g in c["grids"].items()},
                "grid_rule": f"a grid whose best validation top-1 lies at an end is continued past it at the ratio "
                f"there, by up to {c['extend']} values", "chosen_blr": chosen,
                "baseline_settings": {f"{r['method']} {r['percent']}%": r["setting"] for r in baselines
                                      if r["draw"] == 0}}
    result = {"protocol": protocol,
              "summary": {m: {str(p): s for p, s in t.items()} for m, t in stats.items()},
              "pretrain_epochs": curve, "sweeps_val_top1": sweeps, "runs": runs}
    with open(os.path.join(report, "results.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    text = tables(stats, sweeps, chosen, curve, runs, baselines)
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
    return stats, curve


def cell(s):
    if s is None:
        return "–"
    return f"{s['mean']:.2f}" if s["std"] is None else f"{s['mean']:.2f} ± {s['std']:.2f}"


def tables(stats, sweeps, chosen, curve, stages, baselines):
    rows = ["| test top-1 (%), mean ± std over label draws | " + " | ".join(f"{p}% labels" for p in PERCENTS)
            + " |", "|---" * (len(PERCENTS) + 1) + "|"]
    for m, label in METHODS.items():
        rows.append(f"| {label} | " + " | ".join(cell(stats[m].get(p)) for p in PERCENTS) + " |")
    runs = {p: max([stats[m][p]["runs"] for m in stats if p in stats[m]], default=0) for p in PERCENTS}
    rows += ["", "Runs per cell: " + ", ".join(f"{p}%: {n}" for p, n in runs.items()) + ".", ""]
    rows += ["| validation top-1 (%) of draw 0 | blr | 1% labels | 10% labels |", "|---|---|---|---|"]
    for m, grid in sweeps.items():
        for blr in sorted({*grid[1], *grid[10]}, key=float):
            cells = [(f"**{grid[p][blr]:.2f}**" if chosen[m][p] == blr else f"{grid[p][blr]:.2f}")
                     if blr in grid[p] else "–" for p in (1, 10)]
            rows.append(f"| {METHODS[m]} | {blr} | {cells[0]} | {cells[1]} |")
    rows += ["", "| baseline, draw 0 | 1% setting | 10% setting | validation top-1 1% / 10% |", "|---|---|---|---|"]
    first = {(r["method"], r["percent"]): r for r in baselines if r["draw"] == 0}
    for m in METHODS:
        if (m, "1") in first and (m, "10") in first:
            a, b = first[(m, "1")], first[(m, "10")]
            rows.append(f"| {METHODS[m]} | {_setting(a)} | {_setting(b)} | {a['val_acc1']:.2f} / {b['val_acc1']:.2f} |")
    if curve:
        rows += ["", "| MAE pre-training epochs | " + " | ".join(curve) + " |", "|---" * (len(curve) + 1) + "|",
                 "| fine-tune top-1 (%) at 10% labels, draw 0 | " + " | ".join(f"{v:.2f}" for v in curve.values())
                 + " |"]
    rows += ["", "| run | train images | epochs | optimizer steps | final train loss | val top-1 | test top-1 | "
             "wall clock |", "|---|---|---|---|---|---|---|---|"]
    for name, e in stages.items():
        clock = "–" if e["wall_clock_s"] is None else f"{e['wall_clock_s'] / 60:.1f} min"
        if "epochs" not in e:
            rows.append(f"| {name} | | | | | | | {clock} |")
            continue
        val = f"{e['val_acc1']:.2f}" if "val_acc1" in e else "–"
        test = f"{e['test_acc1']:.2f}" if "test_acc1" in e else "–"
        rows.append(f"| {name} | {e['train_images']} | {e['epochs']} | {e['optimizer_steps']} | "
                    f"{e['final_train_loss']:.4f} | {val} | {test} | {clock} |")
    total = sum(e["wall_clock_s"] or 0.0 for e in stages.values())
    rows += ["", f"Total wall clock of the runs: {total / 60:.0f} min."]
    return "\n".join(rows) + "\n"


def _setting(row):
    return ", ".join(f"{k} {v}" for k, v in row["setting"].items())


def plots(study, stats, curve, report):
    """label_efficiency.png (with error bars), pretrain_epochs.png, loss_curves.png and reconstruction.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for m, label in METHODS.items():
        points = sorted(stats[m].items())
        if points:
            x = [p for p, _ in points]
            ax.errorbar(x, [s["mean"] for _, s in points], yerr=[s["std"] or 0.0 for _, s in points], capsize=3,
                        fmt="o-" if m.endswith("_mae") else "s--", label=label)
    ax.set(xscale="log", xticks=PERCENTS, xticklabels=[f"{p}%" for p in PERCENTS], xlabel="labelled training images",
           ylabel="test top-1 (%)", title="Fashion-MNIST: top-1 vs fraction of labels (mean ± std)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(report, "label_efficiency.png"), dpi=100, metadata={"Software": None})
    if curve:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        ax.plot([int(e) for e in curve], list(curve.values()), "o-")
        ax.set(xlabel="MAE pre-training epochs", ylabel="test top-1 (%)", xticks=[int(e) for e in curve],
               title="fine-tuning with 10% of the labels")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(report, "pretrain_epochs.png"), dpi=100, metadata={"Software": None})
    fig, ax = plt.subplots(figsize=(6, 4))
    for epochs in study.c["pretrain_epochs"]:
        logs = read_log(study.folder(f"pretrain_e{epochs}"))
        if logs:
            ax.plot([r["epoch"] + 1 for r in logs], [r["train_loss"] for r in logs], ".-", label=f"{epochs} epochs")
    ax.set(title="MAE pre-training loss (norm-pix)", xlabel="epoch")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(report, "loss_curves.png"), dpi=100, metadata={"Software": None})
    ckpt = study.weights(f"pretrain_pixels_e{study.c['pixel_epochs']}")
    if not os.path.isfile(ckpt):
        return
    test = os.path.join(study.data, "val")
    classes = sorted(os.listdir(test))
    imgs = [os.path.join(test, c, min(os.listdir(os.path.join(test, c)))) for c in classes[::3]]
    if subprocess.call([sys.executable, os.path.join(ROOT, "main_visualize.py"), "--model", MAE, "--resume", ckpt,
                        "--scale", "6", "--output", os.path.join(report, "reconstruction.png"), "--img_path", *imgs],
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
    parser.add_argument("--out", default=os.path.join(HERE, "runs"), help="run outputs (default: runs/ beside "
                        "this script, where the logs and pre-trained weights are kept with the results)")
    parser.add_argument("--report", default=None, help="results.json, results.md and the pictures "
                        "(default: this folder; --out with --smoke)")
    parser.add_argument("--stages", nargs="*", default=None, choices=GROUPS, metavar="STAGE",
                        help=f"default: all, in order: {' '.join(GROUPS)}")
    parser.add_argument("--smoke", action="store_true", help="small grids, 2 label draws, 1 epoch per run")
    args = parser.parse_args(argv)
    default_data = os.path.join(ROOT, "data", "fashion_mnist_smoke" if args.smoke else "fashion_mnist")
    data, out = (_from_root(p) for p in (args.data or default_data, args.out))  # recorded commands run from ROOT
    report = os.path.abspath(args.report or (args.out if args.smoke else HERE))
    os.chdir(ROOT)
    prep = [] if not args.smoke else ["--train_per_class", "45", "--val_per_class", "10"]
    prepare = [sys.executable, os.path.join(ROOT, "demo", "prepare_fashion_mnist.py"), "--out", data, *prep]
    if not os.path.isdir(os.path.join(data, "train")) and subprocess.call(prepare) != 0:
        sys.exit(f"error: could not prepare --data {data} (the message above says why)")
    for flag, folder in (("--out", out), ("--report", report)):
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            sys.exit(f"error: {flag} {folder}: {e.strerror}")
    study = Study(data, out, SMOKE if args.smoke else FULL)
    for group in args.stages or GROUPS:
        study.stage(group)
    if not args.stages:
        stats, curve = collect(study, report)
        plots(study, stats, curve, report)
        with open(os.path.join(report, "results.md"), encoding="utf-8") as f:
            print(f.read())
        print(f"wrote {report}/results.json, results.md and the pictures")


if __name__ == "__main__":
    main()
