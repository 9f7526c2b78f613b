"""The preemption signal: SIGTERM / SIGINT / SIGHUP ask training to stop at the next optimizer step."""
import os
import signal
import sys

from util.dist import all_reduce_sum


class StopSignal:
    """SIGTERM / SIGINT (as SLURM and Kubernetes send before killing a job) and SIGHUP (a closed terminal or
    ssh session) ask training to stop at the next optimizer step; all ranks agree through an all-reduce.
    Further SIGTERMs and SIGHUPs (launchers repeat theirs) are ignored, so that the process saves and exits
    0; a second SIGINT interrupts at once. After SIGHUP, output meant for the lost terminal goes nowhere."""

    def __init__(self):
        self.signum = None

    def install(self):
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.receive(signum)

    def receive(self, signum):
        """Ask for the stop, as the signal signum does (also for signals others handle, such as submitit's
        preemption signal)."""
        self.signum = signum
        if signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        if signum == signal.SIGHUP:
            _leave_terminal()
        # written out directly: at start-up (e.g. during a SLURM job's rendezvous) print is not yet the
        # per-rank print that takes force=True
        sys.stdout.write(f"Received {signal.Signals(signum).name}: stopping after this iteration\n")
        sys.stdout.flush()

    def local_flag(self):
        """1.0 when this process received a stop signal."""
        return 1.0 if self.signum is not None else 0.0

    def requested(self):
        """Whether any rank received a stop signal (a collective: every rank calls it)."""
        return all_reduce_sum([self.local_flag()])[0] > 0


def _leave_terminal():
    """Point stdout/stderr that are a terminal at /dev/null: writing to a hung-up terminal fails."""
    null = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream.isatty():
                stream.flush()
                os.dup2(null, stream.fileno())
        except (OSError, ValueError):
            os.dup2(null, stream.fileno())
    os.close(null)


STOP = StopSignal()
