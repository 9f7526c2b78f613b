"""The preemption signal: SIGTERM / SIGINT ask training to stop at the next optimizer step."""
import signal

from util.dist import all_reduce_sum


class StopSignal:
    """SIGTERM / SIGINT (as SLURM and Kubernetes send before killing a job) ask training to stop at the
    next optimizer step; all ranks agree through an all-reduce. Further SIGTERMs (launchers repeat theirs)
    are ignored, so that the process saves and exits 0; a second SIGINT interrupts at once."""

    def __init__(self):
        self.signum = None
        self.iteration = None

    def install(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.receive(signum)

    def receive(self, signum):
        """Ask for the stop, as the signal signum does (also for signals others handle, such as submitit's
        preemption signal)."""
        self.signum = signum
        if signum == signal.SIGTERM:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(f"Received {signal.Signals(signum).name}: stopping after this iteration", force=True)

    def local_flag(self):
        """1.0 when this process received a stop signal."""
        return 1.0 if self.signum is not None else 0.0

    def requested(self):
        """Whether any rank received a stop signal (a collective: every rank calls it)."""
        return all_reduce_sum([self.local_flag()])[0] > 0


STOP = StopSignal()
