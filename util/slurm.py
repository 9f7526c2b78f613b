"""SLURM jobs through submitit, as the official submitit_*.py scripts: the submission flags, each task's
Paddle environment derived from the job's, and requeue on preemption through training's own stop path."""
import argparse
import hashlib
import importlib
import os
import shutil
import signal

from util import compat
from util.errors import LaunchError, run
from util.preempt import STOP
from util.run_dir import check_writable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def submit_parser(description):
    """The official submitit scripts' own flags; every other flag goes to the training script."""
    parser = argparse.ArgumentParser(description, add_help=False)
    parser.add_argument("--ngpus", default=8, type=int, help="GPUs (tasks) per node")
    parser.add_argument("--nodes", default=2, type=int, help="nodes to request")
    parser.add_argument("--timeout", default=4320, type=int, help="job duration in minutes")
    parser.add_argument("--job_dir", default="", help="job folder (%%j: the job id); default ./jobs/%%j. It "
                        "holds submitit's logs and is the training's --output_dir and --log_dir")
    parser.add_argument("--partition", default="learnfair", type=str, help="partition where to submit")
    parser.add_argument("--use_volta32", action="store_true", help="request 32G V100 GPUs")
    parser.add_argument("--comment", default="", type=str, help="comment to pass to the scheduler")
    parser.add_argument("--cluster", default="slurm", choices=["slurm", "local"],
                        help="local: run the tasks as processes of this machine (one node), to try a submission")
    return parser


def parse(description, script, argv=None):
    """(submission flags, training flags); the training flags are checked by the script's own parser."""
    parser = submit_parser(description)
    submit_args, rest = parser.parse_known_args(argv)
    for flag in ("ngpus", "nodes", "timeout"):
        if getattr(submit_args, flag) < 1:
            parser.error(f"argument --{flag}: must be >= 1, got {getattr(submit_args, flag)}")
    if submit_args.cluster == "local" and submit_args.nodes != 1:
        parser.error("argument --nodes: the local cluster has one node")
    job_dir = submit_args.job_dir or os.path.join("jobs", "%j")
    rest += ["--output_dir", job_dir, "--log_dir", job_dir]  # as the official: the job folder holds everything
    return submit_args, importlib.import_module(script).parse_args(rest)


def main(description, script):
    """Parse the submission and training flags, then submit `script`."""
    submit(script, *parse(description, script))


def submit(script, submit_args, args):
    """Submit `script`.main(args) as one task per GPU; prints the job id (exit 1 with one line on failure)."""
    try:
        import submitit
    except ImportError:
        raise LaunchError("the submitit_*.py scripts need submitit (pip install -r requirements-slurm.txt); "
                          "without SLURM, start each node with python -m paddle.distributed.launch instead") from None
    if submit_args.cluster == "slurm" and shutil.which("sbatch") is None:
        raise LaunchError("SLURM is not available here (no sbatch); submit from a SLURM login node, or start each "
                          "node with python -m paddle.distributed.launch (see the README)")
    folder = args.output_dir
    check_writable(folder.split("%j")[0] or ".", "--job_dir")
    os.environ["PYTHONPATH"] = os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    executor = submitit.AutoExecutor(folder=folder, cluster=submit_args.cluster, slurm_max_num_timeout=30,
                                     local_max_num_timeout=30)
    executor.update_parameters(gpus_per_node=submit_args.ngpus, tasks_per_node=submit_args.ngpus,
                               nodes=submit_args.nodes, timeout_min=submit_args.timeout, name="mae")
    if submit_args.cluster == "slurm":
        extra = {"slurm_constraint": "volta32gb"} if submit_args.use_volta32 else {}
        if submit_args.comment:
            extra["slurm_comment"] = submit_args.comment
        executor.update_parameters(mem_gb=40 * submit_args.ngpus, cpus_per_task=10, slurm_signal_delay_s=120,
                                   slurm_partition=submit_args.partition, **extra)
    job = executor.submit(Trainer(script, args))
    print(f"Submitted job_id: {job.job_id}")
    print(f"Logs and checkpoints in {folder.replace('%j', str(job.job_id))}")
    return job


def task_environment(env, device):
    """Paddle's distributed variables for this task, from submitit's job environment (what
    paddle.distributed.launch would have set): rank, world size, every task's endpoint, this task's, its GPU."""
    per_node = env.num_tasks // env.num_nodes
    hosts = list(env.hostnames)
    port = 20000 + int(hashlib.md5(str(env.job_id).encode()).hexdigest(), 16) % 20000
    endpoints = [f"{hosts[r // per_node]}:{port + 1 + r % per_node}" for r in range(env.num_tasks)]
    out = {"PADDLE_TRAINER_ID": str(env.global_rank), "PADDLE_TRAINERS_NUM": str(env.num_tasks),
           "PADDLE_TRAINER_ENDPOINTS": ",".join(endpoints), "PADDLE_CURRENT_ENDPOINT": endpoints[env.global_rank],
           "PADDLE_LOCAL_RANK": str(env.local_rank), "PADDLE_RANK_IN_NODE": str(env.local_rank),
           "PADDLE_LOCAL_SIZE": str(per_node), "PADDLE_NNODES": str(env.num_nodes),
           "MASTER_ADDR": hosts[0], "MASTER_PORT": str(port)}
    if device.startswith("gpu"):
        out["FLAGS_selected_gpus"] = str(env.local_rank)
    else:
        out["PADDLE_DISTRI_BACKEND"] = "gloo"
    return out


class Trainer:
    """One task of the job: the script's main(args) in a Paddle process group made from the job's tasks. On
    submitit's preemption/timeout signal every task stops training at the next step as on SIGTERM (rank 0
    saves checkpoint-last.pd); then rank 0 hands over to submitit, which requeues the job through
    checkpoint(), and the requeued job resumes from the job folder."""

    def __init__(self, script, args):
        self.script, self.args = script, args

    def __call__(self):
        import submitit

        env = submitit.JobEnvironment()
        os.environ.update(task_environment(env, self.args.device))
        args = self.args.replace(output_dir=self.args.output_dir.replace("%j", str(env.job_id)),
                                 log_dir=self.args.log_dir.replace("%j", str(env.job_id)))
        preempted = compat.preemption_signal(env)
        requeue = signal.getsignal(preempted)  # submitit's checkpoint-and-requeue
        signal.signal(preempted, lambda signum, frame: STOP.receive(signum))
        run(importlib.import_module(self.script).main, args)
        if STOP.signum == preempted and env.global_rank == 0:
            requeue(STOP.signum, None)

    def checkpoint(self):
        """submitit's hook: the same task again; it resumes from checkpoint-last.pd in the job folder."""
        import submitit

        return submitit.helpers.DelayedSubmission(Trainer(self.script, self.args))
