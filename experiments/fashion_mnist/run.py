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
import itertools
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from concurrent import futures
from functools import partial

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [HERE, ROOT]

from grids import EXTEND, beyond_edge  # noqa: E402
from records import epoch_problem, read_baselines, read_records  # noqa: E402
from splits import VAL_PER_CLASS, development_folder, label_subset_folder  # noqa: E402
from util.errors import Error, run as run_main  # noqa: E402

MAE, VIT, SIZE = "mae_vit_micro_patch4", "vit_micro_patch4", 28
PERCENTS = (1, 10, 100)
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
RECIPE_START = {"crop_pct": "0.875", "crop_min": "0.08", "drop_path": "0", "weight_decay": "0.05", "longer": "1"}
DIVERGED = 2 * math.log(10)  # twice the loss of a uniform guess over the 10 classes
BASE = 60  # where the pictures' accuracy axes start, unless a point lies lower
COMMON = ["--print_freq", "100", "--input_size", str(SIZE), "--save_freq", "1000"]
PRETRAIN = ["main_pretrain.py", "--model", MAE, "--mask_ratio", "0.75", "--blr", "2e-3"]
SCRIPTED = {"finetune_mae": ["main_finetune.py", "--model", VIT, "--aa", "none", "--reprob", "0", "--nb_classes", "10"],
            "linprobe_mae": ["main_linprobe.py", "--model", VIT, "--nb_classes", "10"]}
SCRIPTED["finetune_scratch"] = [*SCRIPTED["finetune_mae"], "--layer_decay", "1.0"]
SCRIPTED["partial_mae"] = [*SCRIPTED["finetune_mae"], "--partial_blocks", "1"]
MAE_BASED = ("finetune_mae", "partial_mae", "linprobe_mae")
COMPARED = ("finetune_mae", "finetune_scratch", "partial_mae", "linprobe_mae")
BASELINES = ("logreg_mae", "knn_mae", "logreg_pixels", "knn_pixels", "cnn", "cnn_vit_aug")
METHODS = {"finetune_mae": "fine-tune, MAE encoder", "partial_mae": "fine-tune the last block, MAE encoder",
           "linprobe_mae": "linear probe, MAE encoder", "finetune_scratch": "fine-tune, from scratch",
           "logreg_mae": "logistic regression, MAE features", "knn_mae": "kNN, MAE features",
           "logreg_pixels": "logistic regression, raw pixels", "knn_pixels": "kNN, raw pixels",
           "cnn": "small CNN, flips", "cnn_vit_aug": "small CNN, the ViTs' augmentation"}
TICK = 10  # seconds between the updates of a running wall_clock.txt
HOLD = 2  # seconds a freed share waits for its part's next run (see Shares)
START = 10  # seconds the shares wait at the start of the parts side by side, for every part to ask
LIVE, LIVE_LOCK = set(), threading.Lock()  # the running runs' processes
BEGIN, END = "<!-- results: written by run.py -->", "<!-- end of results -->"


def read_log(folder):
    """The epochs' records of the run in `folder` (records.py: a cut-off last line is left out)."""
    return read_records(os.path.join(folder, "log.txt"), epoch_problem)[0]


def baseline_rows(folder):
    """The rows of the baselines' log in `folder` (records.py)."""
    return read_baselines(os.path.join(folder, "log.txt"))[0]


def last_val(folder, logs):
    """The validation top-1 of the last epoch in `logs`, the records of the run in `folder`."""
    if not logs or "test_acc1" not in logs[-1]:
        raise Error(f"{os.path.join(folder, 'log.txt')}: its last epoch has no validation top-1 ('test_acc1')")
    return logs[-1]["test_acc1"]


def clocks(folder):
    """(wall clock, machine time) in seconds from folder's wall_clock.txt, or None; a file of one line is a
    run that had the whole machine."""
    path = os.path.join(folder, "wall_clock.txt")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        words = f.read().split()
    try:
        values = [float(v) for v in words]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or not all(0 <= v < float("inf") for v in values):
        raise Error(f"{path}: expected the wall clock and the machine time in seconds, one a line")
    return values[0], values[-1]


def wall_clock(folder):
    return (clocks(folder) or (None,))[0]


def machine_time(folder):
    return (clocks(folder) or (None, None))[1]


def say(line):
    """Print `line` in one write: runs side by side print from threads."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def own_cores():
    """The cores this process may run on (all of them where the system cannot pin processes)."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def timed_call(cmd, folder, stdout, cores=None, stop=None):
    """Run cmd from the repository root on `cores` (default: all of this process's), console appended to
    `stdout`, unless the event `stop` is set (then exit: another run failed); add its seconds to folder's
    wall_clock.txt, and below them its machine time, the seconds times its share of the cores (summed over
    resumed attempts, rewritten every TICK seconds so that an attempt killed with the session still
    counts); exit naming the file on failure. The clock advances at most
    2 * TICK per tick, so time the study spends stopped (SIGSTOP, e.g. while the machine measures something
    else) is not counted."""
    os.makedirs(folder, exist_ok=True)
    everything = own_cores()
    cores = set(cores or everything)
    say(f"[{os.path.basename(folder)}] {' '.join(cmd[1:])}")
    spent, machine = clocks(folder) or (0.0, 0.0)
    last = time.monotonic()
    with open(stdout, "a", encoding="utf-8") as log:
        log.write(f"[cores {','.join(map(str, sorted(cores)))} of {len(everything)}]\n")
        log.flush()
        with LIVE_LOCK:  # a failure elsewhere sets `stop` and then ends every process in LIVE
            if stop is not None and stop.is_set():
                sys.exit(f"error: {os.path.basename(folder)} not started: another run failed")
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            LIVE.add(proc)
        if cores != everything:  # before the child starts a thread: its threads and loader workers inherit them
            try:
                os.sched_setaffinity(proc.pid, cores)
            except ProcessLookupError:  # it has ended already
                pass
        code = None
        while code is None:
            try:
                code = proc.wait(timeout=TICK)
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            step = min(now - last, 2 * TICK)
            spent, machine, last = spent + step, machine + step * len(cores) / len(everything), now
            with open(os.path.join(folder, "wall_clock.txt.tmp"), "w") as f:
                f.write(f"{spent:.1f}\n{machine:.1f}\n")
            os.replace(os.path.join(folder, "wall_clock.txt.tmp"), os.path.join(folder, "wall_clock.txt"))
        with LIVE_LOCK:
            LIVE.discard(proc)
    if code != 0:
        sys.exit(f"error: {os.path.basename(folder)} failed; see {stdout}")


class Shares:
    """The shares of the cores, each lent to one run at a time. A freed share goes to the waiting run of the
    earliest-listed part of the study (ties: the longest waiting), and for HOLD seconds only to a part
    listed no later than the one that gave it back: with every part side by side, the longest chain of
    runs one after the other (a recipe's steps, then its comparison) would otherwise lose its share at
    every step to a run that was already waiting while the chain moved on to its next run."""

    def __init__(self, shares):
        self.free, self.waiting, self.order = [(s, math.inf, 0.0) for s in shares], [], itertools.count()
        self.changed = threading.Condition()

    def take(self, rank):
        """A free share for a run whose rank `rank()` gives: it rises while the run waits when an earlier part
        comes to need the same run (see Study.lock), so that part does not wait behind later ones."""
        with self.changed:
            ticket = (next(self.order), rank)
            self.waiting.append(ticket)
            while True:
                now, mine = time.monotonic(), rank()
                free = sorted((i for i, (_, held_for, until) in enumerate(self.free)
                               if mine <= held_for or until <= now),
                              key=lambda i: self.free[i][2] <= now)  # a share held for this part first
                if free and min(self.waiting, key=lambda t: (t[1](), t[0])) is ticket:
                    break
                held = [until - now for _, _, until in self.free if until > now]
                self.changed.wait(min(held) if held and not free else None)
            self.waiting.remove(ticket)
            self.changed.notify_all()  # the next in line may take another free share
            return self.free.pop(free[0])[0]

    def reorder(self):
        """Look again at the waiting runs' ranks: one has risen."""
        with self.changed:
            self.changed.notify_all()

    def give(self, share, rank):
        with self.changed:
            self.free.append((share, rank, time.monotonic() + HOLD))
            self.changed.notify_all()

    def hold(self, seconds):
        """Lend no free share for `seconds`, then to the waiting runs by rank: at a start, the parts that
        ask first are not the ones listed first."""
        with self.changed:
            self.free = [(share, -math.inf, time.monotonic() + seconds) for share, _, _ in self.free]


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


def stats(values):
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
            "runs": len(values), "values": values}


def summary(study):
    """{method: {percent: stats}} of the test top-1 of every reported run (a cell once all its runs are
    tested)."""
    table = {m: {} for m in METHODS}
    for method in COMPARED:
        for percent in PERCENTS:
            names = study.reported(method, percent)
            if all(os.path.isfile(os.path.join(study.folder(n), "test.txt")) for n in names):
                table[method][percent] = [study.test(n) for n in names]
    for row in baseline_rows(study.folder(study.baselines())):
        table[row["method"]].setdefault(int(row["percent"]), []).append(row["test_acc1"])
    return {m: {p: stats(v) for p, v in sorted(t.items())} for m, t in table.items()}


def tested(study, method, pretrain):
    names = study.reported(method, 10, pretrain)
    if all(os.path.isfile(os.path.join(study.folder(n), "test.txt")) for n in names):
        return stats([study.test(n) for n in names])
    return None


def collect(study, report):
    """results.json and results.md from the logs; the tables also replace the marked block of README.md."""
    c = study.c
    table = summary(study)
    recipes = {m: {str(p): study.setting(m, p) for p in (1, 10)} for m in COMPARED}
    validation = {name: study.val_acc(name) for name in study.runs if name.startswith("recipe_")
                  and study.runs[name][2] != 100 and "_draw0_" in name and "_pretrain" not in name}
    curve = {str(e): tested(study, "finetune_mae", str(e)) for e in c["pretrain_epochs"]}
    curve = {e: s for e, s in curve.items() if s}
    seeds = {str(seed): {m: tested(study, m, f"{study.main_pretrain}" + (f"_seed{seed}" if seed else ""))
                         for m in MAE_BASED} for seed in c["pretrain_seeds"]}
    runs = {}
    for name, (flags, epochs, percent) in study.runs.items():
        logs = read_log(study.folder(name)) if epochs is not None else []  # None: the baselines' log
        shipped = [os.path.join(study.folder(name), f) for f in ("log.txt", "test.txt")]
        entry = {"command": " ".join(["python", *flags]),
                 "logs": [os.path.relpath(p, report) for p in shipped if os.path.isfile(p)],
                 "wall_clock_s": wall_clock(study.folder(name)), "machine_s": machine_time(study.folder(name))}
        if logs:
            data = flags[flags.index("--data_path") + 1]
            train = os.path.join(data, "train")
            images = sum(len(os.listdir(os.path.join(train, k))) for k in os.listdir(train))
            entry.update(epochs=len(logs), train_images=images, optimizer_steps=len(logs) * (images // c["batch"]),
                         final_train_loss=logs[-1]["train_loss"], max_train_loss=max(r["train_loss"] for r in logs))
            if "test_acc1" in logs[-1]:
                entry["val_acc1"] = logs[-1]["test_acc1"]
            if os.path.isfile(os.path.join(study.folder(name), "test.txt")):
                entry["test_acc1"] = study.test(name)
        runs[name] = entry
    baselines = baseline_rows(study.folder(study.baselines()))
    protocol = {"selection": "val", "validation": f"{c['val_per_class']} images per class held out from the "
                "training images, never trained on", "main_pretrain_epochs": c["main_pretrain"],
                "test": "the 10,000 test images, evaluated once per reported run with its chosen setting",
                "draws": list(c["draws"]), "draws_at_100": "every draw has all the labels; draw d trains with seed d",
                "epochs": {m: {str(p): study.epochs(m, p, recipes[m]["10"]) for p in PERCENTS} for m in COMPARED},
                "recipe_steps": [dict(s) for s in c["recipe_steps"]], "recipe_start": RECIPE_START,
                "start_blr": c["start_blr"], "recipes": recipes, "probe_grid": list(c["probe_grid"]),
                "diverged": f"a run whose epoch-mean training loss exceeds {DIVERGED:.3f} (twice ln 10) is "
                "not chosen", "grid_rule": f"a blr grid whose best validation top-1 lies at an end is continued "
                f"past it at the ratio there, by up to {c['extend']} values",
                "baseline_settings": {f"{r['method']} {r['percent']}%": r["setting"] for r in baselines
                                      if r["draw"] == 0 and r["percent"] != "100"}}
    cost = {}
    for name, entry in runs.items():
        stage = cost.setdefault(study.stage_of[name], {"runs": 0, "wall_clock_min": 0.0, "machine_min": 0.0})
        stage["runs"] += 1
        stage["wall_clock_min"] += (entry["wall_clock_s"] or 0.0) / 60
        stage["machine_min"] += (entry["machine_s"] or 0.0) / 60
    result = {"protocol": protocol, "summary": {m: {str(p): s for p, s in t.items()} for m, t in table.items()},
              "pretrain_epochs": curve, "pretrain_seeds": seeds, "recipe_val_top1": validation, "cost": cost,
              "runs": runs}
    with open(os.path.join(report, "results.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    text = tables(table, recipes, validation, curve, seeds, runs, baselines, cost)
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
    return table, curve


def cell(s):
    if s is None:
        return "–"
    return f"{s['mean']:.2f}" if s["std"] is None else f"{s['mean']:.2f} ± {s['std']:.2f}"


def tables(table, recipes, validation, curve, seeds, runs, baselines, cost):
    rows = ["| test top-1 (%), mean ± std over the runs | " + " | ".join(f"{p}% labels" for p in PERCENTS)
            + " |", "|---" * (len(PERCENTS) + 1) + "|"]
    for m, label in METHODS.items():
        rows.append(f"| {label} | " + " | ".join(cell(table[m].get(p)) for p in PERCENTS) + " |")
    counts = sorted({s["runs"] for t in table.values() for s in t.values()})
    rows += ["", f"Runs per cell: {', '.join(map(str, counts))} (label draws at 1% and 10%, seeds at 100%).", ""]
    rows += ["| recipe (chosen on validation) | 1% | 10% and 100% |", "|---|---|---|"]
    for m in COMPARED:
        rows.append(f"| {METHODS[m]} | {_recipe(recipes[m]['1'])} | {_recipe(recipes[m]['10'])} |")
    rows += ["", "| validation run (draw 0) | val top-1 |", "|---|---|"]
    rows += [f"| {name} | {acc:.2f} |" for name, acc in validation.items()]
    rows += ["", "| baseline, draw 0 | 1% setting | 10% setting | validation top-1 1% / 10% |", "|---|---|---|---|"]
    first = {(r["method"], r["percent"]): r for r in baselines if r["draw"] == 0}
    for m in BASELINES:
        if (m, "1") in first and (m, "10") in first:
            a, b = first[(m, "1")], first[(m, "10")]
            rows.append(f"| {METHODS[m]} | {_setting(a)} | {_setting(b)} | {a['val_acc1']:.2f} / {b['val_acc1']:.2f} |")
    if curve:
        rows += ["", "| MAE pre-training epochs | " + " | ".join(curve) + " |", "|---" * (len(curve) + 1) + "|",
                 "| fine-tune top-1 (%) at 10% labels, 3 draws | " + " | ".join(map(cell, curve.values())) + " |"]
    rows += ["", "| 10% labels, test top-1 (%) | " + " | ".join(f"pre-training seed {s}" for s in seeds) + " |",
             "|---" * (len(seeds) + 1) + "|"]
    rows += [f"| {METHODS[m]} | " + " | ".join(cell(seeds[s][m]) for s in seeds) + " |" for m in MAE_BASED]
    rows += ["", "| run | train images | epochs | optimizer steps | final train loss | val top-1 | test top-1 | "
             "wall clock |", "|---|---|---|---|---|---|---|---|"]
    for name, e in runs.items():
        clock = "–" if e["wall_clock_s"] is None else f"{e['wall_clock_s'] / 60:.1f} min"
        if "epochs" not in e:
            rows.append(f"| {name} | | | | | | | {clock} |")
            continue
        val = f"{e['val_acc1']:.2f}" if "val_acc1" in e else "–"
        test = f"{e['test_acc1']:.2f}" if "test_acc1" in e else "–"
        rows.append(f"| {name} | {e['train_images']} | {e['epochs']} | {e['optimizer_steps']} | "
                    f"{e['final_train_loss']:.4f} | {val} | {test} | {clock} |")
    rows += ["", "| stage | runs | wall clock | machine time |", "|---|---|---|---|"]
    rows += [f"| {stage} | {c['runs']} | {c['wall_clock_min']:.0f} min | {c['machine_min']:.0f} min |"
             for stage, c in cost.items()]
    total = sum(e["machine_s"] or 0.0 for e in runs.values())
    rows += ["", f"Machine time of these runs: {total / 60:.0f} min (a run's wall clock times its share of the "
             "cores; a run counts in the first stage that needed it)."]
    return "\n".join(rows) + "\n"


def _recipe(recipe):
    return ", ".join(f"{k} {v}" for k, v in recipe.items())


def _setting(row):
    return ", ".join(f"{k} {v}" for k, v in row["setting"].items())


def axis_base(lowest):
    """Where an accuracy axis starts: BASE, or the multiple of 5 below the lowest point (mean - std) where one
    lies lower (0 at the lowest), so that no point falls off the picture."""
    return max(0, min(BASE, 5 * math.floor(min(lowest, default=BASE) / 5)))


def plots(study, table, curve, report):
    """label_efficiency.png and pretrain_epochs.png (mean ± std, the axis base stated), loss_curves.png and
    reconstruction.png (column headings by main_visualize.py)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 5))
    base = axis_base([s["mean"] - (s["std"] or 0.0) for cells in table.values() for s in cells.values()])
    for m, label in METHODS.items():
        points = sorted(table[m].items())
        if points:
            x = [p for p, _ in points]
            runs = sorted({s["runs"] for _, s in points})
            ax.errorbar(x, [s["mean"] for _, s in points], yerr=[s["std"] or 0.0 for _, s in points], capsize=3,
                        fmt="o-" if m in COMPARED else "s--", label=f"{label} ({'/'.join(map(str, runs))} runs)")
    ax.set_ylim(base, 100)
    ax.set(xscale="log", xticks=PERCENTS, xticklabels=[f"{p}%" for p in PERCENTS],
           xlabel="labelled training images (of 55,000)", ylabel=f"test top-1 (%), axis from {base}",
           title="Fashion-MNIST: test top-1 vs labels (mean ± std over the runs)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(report, "label_efficiency.png"), dpi=100, metadata={"Software": None})
    if curve:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        x = [int(e) for e in curve]
        mean = np.array([s["mean"] for s in curve.values()])
        std = np.array([s["std"] or 0.0 for s in curve.values()])
        ax.fill_between(x, mean - std, mean + std, alpha=0.25, label="± std over the draws")
        ax.plot(x, mean, "o-", label=f"mean of {curve[next(iter(curve))]['runs']} label draws")
        base = axis_base(mean - std)
        ax.set_ylim(base, 100)
        ax.set(xlabel="MAE pre-training epochs (0: random initialisation)", ylabel=f"test top-1 (%), axis from {base}",
               xticks=x, title="fine-tuning with 10% of the labels")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(report, "pretrain_epochs.png"), dpi=100, metadata={"Software": None})
    fig, ax = plt.subplots(figsize=(6, 4))
    for epochs in study.c["pretrain_epochs"]:
        logs = read_log(study.folder(f"pretrain_e{epochs}"))
        if logs:
            ax.plot([r["epoch"] + 1 for r in logs], [r["train_loss"] for r in logs], ".-", label=f"{epochs} epochs")
    ax.set(title="MAE pre-training loss", xlabel="epoch",
           ylabel="training loss (MSE on masked patches, norm-pix)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(report, "loss_curves.png"), dpi=100, metadata={"Software": None})
    ckpt = os.path.join(study.folder(f"pretrain_pixels_e{study.c['pixel_epochs']}"), "model.pd")
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
