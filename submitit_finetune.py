"""MAE fine-tuning on SLURM through submitit, as the official submitit_finetune.py: one task per GPU, requeued
on preemption or time-out and resumed from the job folder.

    python submitit_finetune.py --nodes 4 --ngpus 8 --job_dir JOB_DIR [main_finetune.py flags...]
"""
import util  # noqa: F401  (first: keeps Paddle's import-time ccache warning off the console)
from util import slurm
from util.errors import run

if __name__ == "__main__":
    run(slurm.main, "Submitit for MAE fine-tuning", "main_finetune")
