"""The Fashion-MNIST label-efficiency study: MAE pre-training on the training images without labels, then
1%, 10% and 100% of the labels for MAE fine-tuning, partial fine-tuning, the linear probe, fine-tuning from
scratch, logistic regression and kNN on pixels and on MAE features, and a small CNN; every choice (the
small-image recipe, learning rates, baseline settings) made on a validation split held out from the
training images, the test set used once per reported number.

    python experiments/fashion_mnist/run.py                 # everything (resumes where it stopped)
    python experiments/fashion_mnist/run.py --stages pretrain recipe
    python experiments/fashion_mnist/run.py --smoke --out /tmp/fm_smoke   # a few hundred images, 1 epoch each

Each training run is one script call with a fixed output folder; a run whose log.txt has all its epochs is
skipped, and an interrupted one continues from its checkpoint (the scripts auto-resume). Writes
results.json, results.md and the pictures beside this script; rerunning after the last stage rewrites them
identically.
"""
import argparse
import contextlib
import os
import re
import subprocess
import sys
import threading
from concurrent import futures
from functools import partial

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [HERE, ROOT]

from cores import LIVE, LIVE_LOCK, Shares, own_cores, say, timed_call  # noqa: E402
from design import (BASELINES, COMPARED, DIVERGED, MAE, MAE_BASED, PERCENTS, RECIPE_START, SIZE,  # noqa: E402
                    VIT)
from grids import EXTEND, beyond_edge  # noqa: E402
from records import baseline_rows, last_val, read_log  # noqa: E402
from report import collect, plots  # noqa: E402
from splits import VAL_PER_CLASS, development_folder, label_subset_folder  # noqa: E402
from util.errors import run as run_main  # noqa: E402

GROUPS = ("pretrain", "recipe", "compare", "seeds", "curve", "baselines", "pictures")
FULL = {"val_per_class": VAL_PER_CLASS, "draws": (0, 1, 2), "main_pretrain": 50,
        "pretrain_epochs": (0, 10, 25, 50, 100), "pretrain_seeds": (0, 1), "pixel_epochs": 25,
        "lbfgs_iterations": 5000, "extend": EXTEND,
        "extend_longer": 1,  # the epoch multiple past its grid: each doubling doubles every later run
        "epochs": {1: 100, 10: 50, 100: 15}, "eval_freq": {1: 10, 10: 5, 100: 5}, "batch": 128,
        "workers": {1: 0, 10: 2, 100: 2},  # 1%: 4 steps an epoch, less than forking workers every epoch costs
        "scratch_longer": {1: 4, 10: 2, 100: 2},
        "start_blr": {"finetune_mae": "5e-3", "finetune_scratch": "2e-2"},  # the ImageNet recipe's choices
        "probe_grid": ("0.1", "0.8", "6.4", "25.6"),
        "recipe_steps": ({"crop_pct": ("0.875", "1"), "crop_min": ("0.08", "0.25", "0.5")},
                         {"drop_path": ("0", "0.1", "0.2"), "weight_decay": ("0.05", "0.2")}, {"longer": ("1", "2")})}
SMOKE = dict(FULL, val_per_class=5, draws=(0, 1), main_pretrain=1, pretrain_epochs=(0, 1, 2), pixel_epochs=1,
             batch=16, lbfgs_iterations=50, extend=1, epochs={p: 1 for p in PERCENTS},
             eval_freq={p: 1 for p in PERCENTS}, scratch_longer={p: 2 for p in PERCENTS}, probe_grid=("0.1", "0.8"),
             recipe_steps=({"crop_pct": ("0.875", "1")}, {"drop_path": ("0", "0.1")}, {"longer": ("1", "2")}))
COMMON = ["--print_freq", "100", "--input_size", str(SIZE), "--save_freq", "1000"]
PRETRAIN = ["main_pretrain.py", "--model", MAE, "--mask_ratio", "0.75", "--blr", "2e-3"]
SCRIPTED = {"finetune_mae": ["main_finetune.py", "--model", VIT, "--aa", "none", "--reprob", "0", "--nb_classes", "10"],
            "linprobe_mae": ["main_linprobe.py", "--model", VIT, "--nb_classes", "10"]}
SCRIPTED["finetune_scratch"] = [*SCRIPTED["finetune_mae"], "--layer_decay", "1.0"]
SCRIPTED["partial_mae"] = [*SCRIPTED["finetune_mae"], "--partial_blocks", "1"]
START = 10  # seconds the shares wait at the start of the parts side by side, for every part to ask


def blr_string(value):
    """A swept value as the run names spell it: 2e-2, 1.25e-3, 102.4."""
    if value >= 0.1:
        return f"{value:.4g}"
    mantissa, exponent = f"{value:.3e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


class Study:
    """The study's runs, each a script call with its output folder out/NAME."""

    def __init__(self, data, out, config, jobs=1):
        self.data, self.out, self.c = data, out, config
        cores = sorted(own_cores())
        self.jobs = max(1, min(jobs, len(cores)) if hasattr(os, "sched_setaffinity") else 1)
        self.shares = Shares(cores[i * len(cores) // self.jobs:(i + 1) * len(cores) // self.jobs]
                             for i in range(self.jobs))  # each of `jobs` runs at a time on its own share
        self.rank = threading.local()  # .value: the place of the part of the study this thread works for
        self.dev = development_folder(data, config["val_per_class"])
        self.subsets = {(p, d): label_subset_folder(self.dev, p, d) if p != 100 else self.dev
                        for p in PERCENTS for d in config["draws"]}
        self.main_pretrain = config["main_pretrain"]  # the epochs of the pre-training classifiers start from
        self.runs = {}  # name -> (flags, epochs, percent)
        self.stage_of, self.current = {}, None  # name -> the first stage that needed the run
        self.locks, self.locks_lock, self.wanted = {}, threading.Lock(), {}  # wanted: run -> ranks in its lock
        self.stopping, self.failure = threading.Event(), None  # set by the first failure: no run starts after it

    def folder(self, name):
        return os.path.join(self.out, name)

    @contextlib.contextmanager
    def lock(self, name):
        """Hold run `name` while it trains or is tested: parts of the study that run together share runs (the
        curve's main point is the comparison's 10% run), and one of them trains it, ranked for the shares of
        the cores as the earliest-listed of the parts that wait for it."""
        rank = getattr(self.rank, "value", 0)
        with self.locks_lock:
            lock = self.locks.setdefault(name, threading.RLock())
            self.wanted.setdefault(name, []).append(rank)
        self.shares.reorder()
        try:
            with lock:
                yield
        finally:
            with self.locks_lock:
                self.wanted[name].remove(rank)

    def rank_of(self, name):
        with self.locks_lock:
            return min(self.wanted[name])

    def call(self, name, cmd, folder, stdout):
        """timed_call for run `name` (held: self.lock) on the next free share of the cores."""
        cores = self.shares.take(partial(self.rank_of, name))
        try:
            timed_call(cmd, folder, stdout, cores, self.stopping)
        except BaseException as e:
            self.stop(e)  # before the share is free: the run waiting for it must not start
            raise
        finally:
            self.shares.give(cores, self.rank_of(name))

    def stop(self, failure):
        """End every running run and start no other: the first failure ends the study (and is what it
        reports; the runs it stops fail after it)."""
        with LIVE_LOCK:
            if not self.stopping.is_set():
                self.failure = failure
            self.stopping.set()
            for proc in LIVE:
                proc.terminate()

    def checkpoint(self, name):
        return os.path.join(self.folder(name), "checkpoint-last.pd")

    def weights(self, pretrain):
        """The model weights of a finished pre-training (no optimizer state): what later stages start from,
        kept with the logs."""
        return os.path.join(self.folder(f"pretrain_e{pretrain}"), "model.pd")

    def pretrain(self, epochs, pixels=False, seed=0):
        name = (f"pretrain_pixels_e{epochs}" if pixels else f"pretrain_e{epochs}") + (f"_seed{seed}" if seed else "")
        flags = [*PRETRAIN, *([] if pixels else ["--norm_pix_loss"]), "--data_path", self.dev,
                 "--warmup_epochs", str(epochs // 10), *(["--seed", str(seed)] if seed else [])]
        with self.lock(name):
            self.train(name, flags, epochs, 100)
            model = os.path.join(self.folder(name), "model.pd")
            if not os.path.isfile(model):
                convert = [sys.executable, "-m", "util.convert_weights", self.checkpoint(name), model]
                if subprocess.call(convert, cwd=ROOT) != 0:
                    sys.exit(f"error: could not write {model} (the message above says why)")

    def epochs(self, method, percent, recipe=None):
        """c["epochs"] (MAE fine-tuning's; the probe's and partial fine-tuning's alike), c["scratch_longer"]
        times as many from scratch, which has no pre-training to start from; times the recipe's `longer`."""
        longer = self.c["scratch_longer"][percent] if method == "finetune_scratch" else 1
        return max(1, round(self.c["epochs"][percent] * longer * float((recipe or {}).get("longer", "1"))))

    def run(self, method, percent, draw, recipe, pretrain=None):
        """One training run of `method` on label draw `draw` (seed `draw`; at 100% every draw has all the
        labels) with `recipe`, from the MAE pre-training `pretrain` ("50", "50_seed1"; "0": random
        initialisation); its name."""
        return self.train(*self.spec(method, percent, draw, recipe, pretrain))

    def spec(self, method, percent, draw, recipe, pretrain=None):
        """(name, flags, epochs, percent) of self.run's run. Its name spells all of them; the epochs only when
        the recipe multiplies them."""
        main = str(self.main_pretrain)
        pretrain = pretrain or main
        longer = recipe["longer"]
        name = (f"recipe_{method}_{percent}pct_draw{draw}_crop{recipe['crop_min']}_eval{recipe['crop_pct']}"
                + (f"_dp{recipe['drop_path']}_wd{recipe['weight_decay']}" if "drop_path" in recipe else "")
                + ("" if longer == "1" else f"_x{longer}") + f"_blr{recipe['blr']}"
                + ("" if pretrain == main else f"_pretrain{pretrain}"))
        epochs = self.epochs(method, percent, recipe)
        flags = [*SCRIPTED[method], "--blr", recipe["blr"], "--data_path", self.subsets[(percent, draw)],
                 "--seed", str(draw), "--warmup_epochs", str(min(5, self.c["epochs"][percent])),
                 "--eval_freq", str(self.c["eval_freq"][percent] * epochs // self.c["epochs"][percent]),
                 "--crop_scale", recipe["crop_min"], "1", "--crop_pct", recipe["crop_pct"]]
        if "drop_path" in recipe:
            flags += ["--drop_path", recipe["drop_path"], "--weight_decay", recipe["weight_decay"]]
        if method != "finetune_scratch" and pretrain != "0":
            flags += ["--finetune", self.weights(pretrain)]
        return name, flags, epochs, percent

    def run_many(self, calls):
        """self.run(*call) for every call, up to `jobs` at a time, each pinned to its share of the cores (a run
        of this small ViT gains less from a second core than a second run does); their names. A failure
        stops the others (they resume on the next start)."""
        for call in calls:  # the report lists the runs in the order the study needs them
            self.enter(self.spec(*call)[0])
        return self.together([partial(self.run, *call) for call in calls], self.jobs)

    def together(self, functions, workers, ranks=None):
        """Call `functions` in up to `workers` threads, ranked `ranks` (default: this thread's rank) for the
        shares of the cores; their results, in order. The first failure stops every run of the study (they
        resume on the next start) and is raised."""
        def ranked(rank, function):
            self.rank.value = rank
            return function()

        if not functions:
            return []
        ranks = ranks or [getattr(self.rank, "value", 0)] * len(functions)
        with futures.ThreadPoolExecutor(workers) as pool:
            pending = [pool.submit(ranked, rank, f) for rank, f in zip(ranks, functions)]
            done, _ = futures.wait(pending, return_when=futures.FIRST_EXCEPTION)
            failed = [f for f in done if f.exception()]
            if failed:
                for f in pending:
                    f.cancel()
                self.stop(failed[0].exception())
                raise self.failure
            return [f.result() for f in pending]

    def score(self, name):
        """What a choice on validation compares: the last epoch's validation top-1, or -1 for a run that
        diverged (an epoch's mean training loss above DIVERGED, twice chance level's)."""
        logs = read_log(self.folder(name))
        val = last_val(self.folder(name), logs)
        return -1.0 if max(r["train_loss"] for r in logs) > DIVERGED else val

    def sweep(self, method, percent, recipe, values, key="blr", spell=blr_string, extend=None):
        """The value of `key` (of `values`, numbers, spelled in run names by `spell`) with the best validation
        score of draw 0, the grid continued past an end that holds the best by up to `extend` values (default
        c["extend"]; ties: the smaller); every run is trained."""
        values = list(values)

        def score(value):
            return self.score(self.run(method, percent, 0, {**recipe, key: spell(value)}))

        self.run_many([(method, percent, 0, {**recipe, key: spell(v)}) for v in values])
        for _ in range(self.c["extend"] if extend is None else extend):
            value = beyond_edge(values, [score(v) for v in values])
            if value is None:
                break
            values.append(value)
        return spell(max(values, key=lambda v: (score(v), -v)))

    def recipe(self, method):
        """The small-image recipe of fine-tuning `method` at 10% labels, chosen on validation one step at a time
        (each step's grid over its keys, the others at the best so far; ties: the earlier), the epoch multiple
        continued past an end, then blr at half, once and twice the starting one, continued past an end."""
        best = {**RECIPE_START, "blr": self.c["start_blr"][method]}
        for step in self.c["recipe_steps"]:
            grid = [dict(best)]
            for key, values in step.items():
                grid = [{**g, key: v} for g in grid for v in values]
            scores = [self.score(name) for name in self.run_many([(method, 10, 0, g) for g in grid])]
            best = grid[max(range(len(grid)), key=lambda i: (scores[i], -i))]
        best["longer"] = self.sweep(method, 10, best, map(float, self.c["recipe_steps"][-1]["longer"]), "longer",
                                    lambda v: f"{v:g}", self.c["extend_longer"])
        centre = float(best["blr"])
        return {**best, "blr": self.sweep(method, 10, best, [centre / 2, centre, centre * 2])}

    def setting(self, method, percent):
        """The recipe `method` runs with at `percent` (100%: the 10% one). Fine-tuning and scratch take their
        own recipe, with blr swept again at 1%; partial fine-tuning takes MAE fine-tuning's with its own blr
        sweep, the probe MAE fine-tuning's crops and epochs with its own blr sweep."""
        percent = 10 if percent == 100 else percent
        mae = self.recipe("finetune_mae")
        if method in ("finetune_mae", "finetune_scratch"):
            recipe = self.recipe(method)
            if percent == 10:
                return recipe
        elif method == "partial_mae":
            recipe = mae
        else:
            recipe = {key: mae[key] for key in ("crop_min", "crop_pct", "longer")}
            return {**recipe, "blr": self.sweep(method, percent, recipe, map(float, self.c["probe_grid"]))}
        centre = float(recipe["blr"])
        return {**recipe, "blr": self.sweep(method, percent, recipe, [centre / 2, centre, centre * 2])}

    def train(self, name, flags, epochs, percent):
        flags = [*flags, "--output_dir", self.folder(name), "--log_dir", self.folder(name), "--epochs", str(epochs),
                 "--batch_size", str(self.c["batch"]), "--num_workers", str(self.c["workers"][percent]), *COMMON]
        with self.lock(name):
            if len(read_log(self.folder(name))) < epochs:
                self.call(name, [sys.executable, *flags], self.folder(name), self.folder(name) + ".stdout")
            elif self.runs.get(name) is None:
                say(f"[{name}] done already")
        self.enter(name)
        self.runs[name] = (flags, epochs, percent)
        return name

    def enter(self, name):
        """Give run `name` its place in self.runs (None until trained) and the stage that first needed it."""
        self.runs.setdefault(name, None)
        self.stage_of.setdefault(name, self.current)

    def test(self, name):
        """Top-1 on the test set of run `name`'s last checkpoint, measured once and kept in NAME/test.txt. A run
        trained on another machine has its logs but no checkpoint (they stay out of the repository): it is
        trained again first, its earlier log kept as log.first.txt."""
        folder = self.folder(name)
        path = os.path.join(folder, "test.txt")
        with self.lock(name):
            found = re.findall(r"\* Acc@1 ([\d.]+)", open(path).read()) if os.path.isfile(path) else []
            if not found:
                flags = self.runs[name][0]
                if not os.path.isfile(self.checkpoint(name)):
                    say(f"[{name}] no checkpoint to test: training it again")
                    os.replace(os.path.join(folder, "log.txt"), os.path.join(folder, "log.first.txt"))
                    self.call(name, [sys.executable, *flags], folder, folder + ".stdout")
                script, model = flags[:3:2]
                self.call(name, [sys.executable, script, "--model", model, "--eval", "--resume", self.checkpoint(name),
                                 "--crop_pct", flags[flags.index("--crop_pct") + 1], "--nb_classes", "10",
                                 "--data_path", self.data, "--batch_size", "256", "--num_workers", "2", "--input_size",
                                 str(SIZE), "--output_dir", "", "--log_dir", ""],
                          os.path.join(self.folder(name), "test"), path)
                found = re.findall(r"\* Acc@1 ([\d.]+)", open(path).read())
            return float(found[-1])

    def val_acc(self, name):
        return last_val(self.folder(name), read_log(self.folder(name)))  # the scripts' "test" set is validation

    def reported(self, method, percent, pretrain=None):
        """The tested runs of `method` at `percent`, one per draw."""
        return self.run_many(self.draws(method, percent, pretrain))

    def draws(self, method, percent, pretrain=None):
        """The calls of self.run that train the tested runs of `method` at `percent` (its setting chosen)."""
        setting = self.setting(method, percent)
        return [(method, percent, d, setting, pretrain) for d in self.c["draws"]]

    def test_all(self, calls):
        """Train the runs of `calls` (the longest first: their percent) together, each tested as soon as it is
        trained: the checkpoint a test reads is not kept with the logs, so a machine that ends between a run
        and its test would otherwise lose the run."""
        calls = sorted(calls, key=lambda call: -call[1])
        for call in calls:
            self.enter(self.spec(*call)[0])
        self.together([partial(self.trained_and_tested, *call) for call in calls], self.jobs)

    def trained_and_tested(self, *call):
        return self.test(self.run(*call))

    def baselines(self):
        """The baselines' run (baselines.py) on the evaluation images of MAE fine-tuning's recipe, the CNN for
        scratch's epochs; its name spells the crops."""
        mae, scratch = self.recipe("finetune_mae"), self.recipe("finetune_scratch")
        name = f"baselines_crop{mae['crop_min']}_eval{mae['crop_pct']}"
        train = [f"{p}:{d}={folder}/train" for (p, d), folder in sorted(self.subsets.items())]
        flags = [os.path.join("experiments", "fashion_mnist", "baselines.py"), "--train", *train, "--val",
                 f"{self.dev}/val", "--test", f"{self.data}/val", "--checkpoint", self.weights(self.main_pretrain),
                 "--model", VIT, "--input_size", str(SIZE), "--crop_pct", mae["crop_pct"], "--crop_min",
                 mae["crop_min"], "--epochs",
                 *[f"{p}={self.epochs('finetune_scratch', p, scratch)}" for p in PERCENTS],
                 "--max_iter", str(self.c["lbfgs_iterations"]), "--log", os.path.join(self.folder(name), "log.txt")]
        self.enter(name)
        self.runs[name] = (flags, None, None)
        with self.lock(name):
            if len(baseline_rows(self.folder(name))) < len(self.subsets) * len(BASELINES):
                self.call(name, [sys.executable, *flags], self.folder(name), self.folder(name) + ".stdout")
        return name

    def compare(self, method, percent, pretrain=None):
        """Train and test the runs of `method` at `percent` from the pre-training `pretrain` (default: the main
        one, which the pretrain stage trains; others are trained here first)."""
        if pretrain not in (None, "0"):
            epochs, _, seed = pretrain.partition("_seed")
            self.pretrain(int(epochs), seed=int(seed or 0))
        self.test_all(self.draws(method, percent, pretrain))

    def parts(self, group):
        """Stage `group` as functions that do not wait for each other's results."""
        c = self.c
        if group == "pretrain":
            return [partial(self.pretrain, self.main_pretrain)]
        if group == "recipe":
            return [partial(self.recipe, method) for method in ("finetune_mae", "finetune_scratch")]
        if group == "compare":  # the longest runs first
            return [partial(self.compare, method, p) for method in COMPARED for p in sorted(PERCENTS, reverse=True)]
        if group == "seeds":
            return [partial(self.compare, method, 10, f"{self.main_pretrain}_seed{seed}")
                    for seed in c["pretrain_seeds"][1:] for method in MAE_BASED]
        if group == "curve":
            return [partial(self.compare, "finetune_mae", 10, str(e)) for e in c["pretrain_epochs"]]
        if group == "baselines":
            return [self.baselines]
        return [partial(self.pretrain, c["pixel_epochs"], pixels=True)]

    def stage(self, group):
        self.current = group
        for part in self.parts(group):
            part()

    def stages_together(self, groups):
        """Train and test every run of `groups` with all the stages' parts side by side after the main
        pre-training, each run on one share of the cores as they free up (first to the earliest-listed
        part): no share waits for a stage's last run. The report comes from a pass in order after it,
        which finds every run done."""
        if "pretrain" in groups:
            self.stage("pretrain")
        parts = [part for group in groups if group != "pretrain" for part in self.parts(group)]
        self.shares.hold(START)
        self.together(parts, max(1, len(parts)), ranks=list(range(len(parts))))
        self.runs, self.stage_of = {}, {}


def _from_root(path):
    """`path` relative to the repository root when it lies inside it, else absolute."""
    path = os.path.abspath(path)
    return os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None, help="ImageFolder root, made from the IDX files when it has no "
                        "train/ (default: data/fashion_mnist, data/fashion_mnist_smoke with --smoke)")
    parser.add_argument("--out", default=os.path.join(HERE, "runs"), help="run outputs (default: runs/ beside "
                        "this script, where the logs and pre-trained weights are kept with the results)")
    parser.add_argument("--report", default=None, help="results.json, results.md and the pictures "
                        "(default: this folder; --out with --smoke)")
    parser.add_argument("--stages", nargs="*", default=None, choices=GROUPS, metavar="STAGE",
                        help=f"default: all, in order: {' '.join(GROUPS)}")
    parser.add_argument("--smoke", action="store_true", help="small grids, 2 label draws, 1 epoch per run")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each pinned to its share of "
                        "the cores (2 on 2 cores: ~1.45x the runs an hour of one at a time; default: 1)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"argument --jobs: must be >= 1, got {args.jobs}")
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
    study = Study(data, out, SMOKE if args.smoke else FULL, args.jobs)
    if study.jobs > 1:
        study.stages_together(args.stages or GROUPS)
    for group in args.stages or GROUPS:
        study.stage(group)
    if not args.stages:
        stats, curve = collect(study, report)
        plots(study, stats, curve, report)
        with open(os.path.join(report, "results.md"), encoding="utf-8") as f:
            print(f.read())
        print(f"wrote {report}/results.json, results.md and the pictures")


if __name__ == "__main__":
    run_main(main)
