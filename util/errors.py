"""The faults a script reports as one line, `error: ...`, and its exit code: one base type, subclasses where a
caller tells them apart, and one place (run) that turns them into the exit. Each message names the file, flag
or key at fault."""
import sys


class Error(RuntimeError):
    """A fault of the input, the environment or the run that ends the script with one line (exit 1)."""
    exit_code = 1


class FlagError(Error):
    """A flag that does not fit what the run found at start (exit 2, as argparse's own flag errors)."""
    exit_code = 2


class DataError(Error):
    """A dataset folder or image file cannot be used."""


class CheckpointError(Error):
    """A checkpoint file cannot be read or does not fit the model."""


class UnsafePickleError(CheckpointError):
    """A pickle asks for something other than arrays and plain containers."""


class RunDirError(Error):
    """The output folder cannot be used by this run."""


class WriteError(Error):
    """An output file cannot be written (a full disk, a missing permission); nothing partial is left."""


class DownloadError(Error):
    """A released checkpoint could not be fetched or checked; the message says where to put it by hand."""


class LaunchError(Error):
    """The environment describes a launch this process is not part of, or lacks what the launch needs."""


class NonFiniteError(Error):
    """The loss (or, at a checkpoint, the weights) became NaN or infinite in the optimizer step of `iteration`
    of `epoch`; `loss` tells which."""

    def __init__(self, what, epoch, iteration, loss=True, after=""):
        super().__init__(f"{what} at epoch {epoch}, iteration {iteration}{after}, stopping training")
        self.what, self.epoch, self.iteration, self.loss = what, epoch, iteration, loss


def run(main, *args):
    """main(*args); an Error ends the process with its one line on stderr and its exit code."""
    try:
        return main(*args)
    except Error as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(e.exit_code)
