"""The study's report from its logs: results.json, results.md (also written into the marked block of the
README) and the pictures."""
import json
import math
import os
import subprocess
import sys

import numpy as np

from cores import ROOT, machine_time, wall_clock
from design import BASELINES, COMPARED, DIVERGED, MAE, MAE_BASED, METHODS, PERCENTS, RECIPE_START
from records import baseline_rows, read_log

BASE = 60  # where the pictures' accuracy axes start, unless a point lies lower
BEGIN, END = "<!-- results: written by run.py -->", "<!-- end of results -->"


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
