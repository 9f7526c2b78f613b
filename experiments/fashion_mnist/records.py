"""The study's JSON-lines logs: a training run's log.txt (one record per epoch) and the baselines' log (one per
method, fraction and draw), each line appended as its work ends. A last line without its newline is a write
cut off by a kill: it is left out, and the work behind it done again (the training scripts drop such a line
when they resume). Any other line that is not a whole record is refused, naming the file, line and field:
the study's tables are computed on these records."""
import json
import os

from grids import BASELINE_GRIDS, BASELINE_METHODS
from util.errors import Error, WriteError


def read_records(path, problem, key=None):
    """(records, cut): the records of `path` ([] when it does not exist) and whether its last line was cut
    off. problem(record) is what is wrong with a record, or None; two records of one key(record) are refused,
    as which of them counts would be a guess."""
    if not os.path.isfile(path):
        return [], False
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    records, seen = [], {}
    for i, (n, line) in enumerate(lines):
        if i == len(lines) - 1 and not line.endswith("\n"):
            return records, True
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        why = problem(record) if isinstance(record, dict) else "not a JSON object"
        if not why and key is not None:
            first = seen.setdefault(key(record), n)
            why = None if first == n else f"{key(record)} again (first on line {first})"
        if why:
            raise Error(f"{path} line {n}: {why}")
        records.append(record)
    return records, False


def _number(value, low=float("-inf"), high=float("inf")):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high


def _whole(value, low=0):
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def epoch_problem(record):
    """What a training run's log line lacks: its epoch, its training loss, a validation top-1 if it has one."""
    if not _whole(record.get("epoch")):
        return "'epoch' is not a whole number >= 0"
    if not _number(record.get("train_loss")):
        return "'train_loss' is not a number"
    if "test_acc1" in record and not _number(record["test_acc1"], 0, 100):
        return "'test_acc1' is not a top-1 in [0, 100]"
    return None


def baseline_problem(row):
    """What a baselines' log line lacks of the fields the study reads: its method, fraction and draw, the
    setting (a value of the method's grid and the features), the validation and test top-1."""
    if row.get("method") not in BASELINE_METHODS:
        return f"'method' {row.get('method')!r} is not one of {', '.join(BASELINE_METHODS)}"
    if not (isinstance(row.get("percent"), str) and row["percent"].isdigit()):
        return "'percent' is not a whole number in a string"
    if not _whole(row.get("draw")):
        return "'draw' is not a whole number >= 0"
    kind, features = BASELINE_METHODS[row["method"]]
    key = BASELINE_GRIDS[kind][0]
    setting = row.get("setting")
    if not (isinstance(setting, dict) and setting.keys() == {key, "features"} and setting["features"] in features
            and (_whole(setting[key], 1) if kind == "knn" else _number(setting[key]) and setting[key] > 0)):
        return (f"'setting' is not {{'{key}': a {'whole ' if kind == 'knn' else ''}number > 0, 'features': one of "
                f"{', '.join(features)}}}")
    for key in ("val_acc1", "test_acc1"):
        if not _number(row.get(key), 0, 100):
            return f"'{key}' is not a top-1 in [0, 100]"
    return None


def read_baselines(path):
    """(rows, cut) of the baselines' log `path`, one row per method, fraction and draw."""
    return read_records(path, baseline_problem,
                        lambda row: f"{row['method']} at {row['percent']}% draw {row['draw']}")


def drop_cut_line(path):
    """Cut `path` back to its last whole line, before a line is appended to it."""
    try:
        with open(path, "rb") as f:
            whole = f.read().rfind(b"\n") + 1
        os.truncate(path, whole)
    except OSError as e:
        raise WriteError(f"{path}: cannot drop its last line, cut off ({e.strerror or e})") from None


def read_log(folder):
    """The epochs' records of the run in `folder` (a cut-off last line is left out)."""
    return read_records(os.path.join(folder, "log.txt"), epoch_problem)[0]


def baseline_rows(folder):
    """The rows of the baselines' log in `folder`."""
    return read_baselines(os.path.join(folder, "log.txt"))[0]


def last_val(folder, logs):
    """The validation top-1 of the last epoch in `logs`, the records of the run in `folder`."""
    if not logs or "test_acc1" not in logs[-1]:
        raise Error(f"{os.path.join(folder, 'log.txt')}: its last epoch has no validation top-1 ('test_acc1')")
    return logs[-1]["test_acc1"]
