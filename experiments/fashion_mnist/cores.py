"""The study's runs as processes, each pinned to a share of the cores (Shares lends them), and their clocks:
wall_clock.txt holds a run's wall clock and its machine time (the wall clock times its share of the cores)."""
import itertools
import math
import os
import subprocess
import sys
import threading
import time

from util.errors import Error

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TICK = 10  # seconds between the updates of a running wall_clock.txt
HOLD = 2  # seconds a freed share waits for its part's next run (see Shares)
LIVE, LIVE_LOCK = set(), threading.Lock()  # the running runs' processes


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
