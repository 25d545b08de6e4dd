"""Train on N SLURM nodes x G GPUs: writes an sbatch script (one JAX process per node) and, with --submit, runs sbatch.

    python launch/slurm.py --nodes 2 --gpus-per-node 8 --partition gpu --time 12:00:00 \\
        --config configs/clip/vit_b32_finetune.yaml --workdir /shared/runs/vit_b32 train.steps=10000 --dry-run
    python launch/slurm.py --nodes 4 --gpus-per-node 4 --prelude 'source .venv/bin/activate' \\
        --config configs/pab/beit3_large_patch16_384.yaml --submit

The script asks for --nodes nodes with one task each, sets JAX_COORDINATOR_ADDRESS to the first node of the
allocation (`scontrol show hostnames $SLURM_JOB_NODELIST`) and --port, JAX_NUM_PROCESSES=$SLURM_NNODES, and
JAX_PROCESS_ID=$SLURM_PROCID in each task, and `srun`s the train command; the trainer calls
jax.distributed.initialize() from these variables. The job runs in the folder sbatch is called from, so --config,
--workdir and --output are relative to it (the nodes must share that file system).
Without --submit the script is written to --script and the sbatch command printed; --dry-run prints both the
script (as a `cat > FILE <<'EOF'` here-document) and the sbatch command, and writes nothing.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as `python launch/slurm.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.common import (  # noqa: E402
    LaunchError,
    add_train_arguments,
    int_in,
    matching,
    parse_with_overrides,
    report,
    run_commands,
    train_command,
)

SLURM_NAME = r"[A-Za-z0-9._-]+"
SLURM_TIME = r"([0-9]+-)?[0-9]+(:[0-9]{2}){0,2}"  # minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS


def sbatch_header(args: argparse.Namespace) -> list[str]:
    options = {"job-name": args.job_name, "nodes": args.nodes, "ntasks-per-node": 1,
               "gpus-per-node": args.gpus_per_node, "cpus-per-task": args.cpus_per_task, "time": args.time,
               "partition": args.partition, "account": args.account, "output": args.output}
    return [f"#SBATCH --{key}={value}" for key, value in options.items() if value is not None]


def task_command(args: argparse.Namespace) -> str:
    """The srun line: each task sets its JAX_PROCESS_ID from SLURM_PROCID, then execs the train command."""
    train = shlex.join(train_command(args.python, args.config, args.workdir, args.overrides))
    task = f"export JAX_PROCESS_ID=$SLURM_PROCID; exec {train}"
    srun = ["srun", "--ntasks-per-node=1", f"--cpus-per-task={args.cpus_per_task}", "--kill-on-bad-exit=1"]
    return f"{shlex.join(srun)} bash -c {shlex.quote(task)}"


def batch_script(args: argparse.Namespace) -> str:
    """The sbatch script for a run of args.nodes processes, one per node."""
    lines = ["#!/bin/bash", *sbatch_header(args),
             "# Written by launch/slurm.py: one JAX process per node, rank 0 on the first node.",
             "set -eo pipefail", *args.prelude,
             'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)',  # not head: SIGPIPE + pipefail
             f'export JAX_COORDINATOR_ADDRESS="$head_node:{args.port}"',
             'export JAX_NUM_PROCESSES="$SLURM_NNODES"',
             task_command(args)]
    return "\n".join(lines) + "\n"


def submit_commands(args: argparse.Namespace) -> list[list[str]]:
    """mkdir for the --output folder (SLURM does not create it), then sbatch."""
    output_dir = os.path.dirname(args.output)
    return ([["mkdir", "-p", output_dir]] if output_dir else []) + [["sbatch", args.script]]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python launch/slurm.py", description=__doc__.split("\n")[0],
                                     epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawTextHelpFormatter)
    job = parser.add_argument_group("job")
    job.add_argument("--nodes", type=int_in(1), required=True, help="nodes (one JAX process each)")
    job.add_argument("--gpus-per-node", type=int_in(1), required=True, help="GPUs per node")
    job.add_argument("--cpus-per-task", type=int_in(1), default=8, help="CPU cores per node's process (default: 8)")
    job.add_argument("--time", type=matching(SLURM_TIME, "time limit", "12:00:00, 2-00:00:00"), default="24:00:00",
                     help="time limit (default: 24:00:00)")
    job.add_argument("--partition", type=matching(SLURM_NAME, "partition", "gpu"))
    job.add_argument("--account", type=matching(SLURM_NAME, "account", "my-lab"))
    job.add_argument("--job-name", type=matching(SLURM_NAME, "job name", "clip-b32"), default="jaxretrieval")
    job.add_argument("--output", type=matching(r"\S+", "output path", "logs/%%x-%%j.out"), default="%x-%j.out",
                     help="stdout/stderr of the job (default: %%x-%%j.out, i.e. JOBNAME-JOBID.out)")
    job.add_argument("--port", type=int_in(1024, 65535), default=8476, help="coordinator port (default: 8476)")
    job.add_argument("--prelude", action="append", default=[], metavar="LINE",
                     help="shell line run before srun, e.g. 'source .venv/bin/activate' (repeatable)")
    parser.add_argument("--script", help="where to write the batch script (default: JOB_NAME.sbatch)")
    parser.add_argument("--submit", action="store_true", help="run sbatch on the written script")
    parser.add_argument("--dry-run", action="store_true", help="print the script and the sbatch command only")
    add_train_arguments(parser, python="python")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_with_overrides(build_parser(), argv)
    args.script = args.script or f"{args.job_name}.sbatch"
    script = batch_script(args)
    if args.dry_run:
        print(f"cat > {shlex.quote(args.script)} <<'EOF'\n{script}EOF")
        run_commands(submit_commands(args), dry_run=True)
        return 0
    Path(args.script).write_text(script)
    print(f"wrote {args.script}")
    if not args.submit:
        print("submit with: " + " && ".join(shlex.join(command) for command in submit_commands(args)))
        return 0
    try:
        run_commands(submit_commands(args), dry_run=False)
    except LaunchError as e:
        return report(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
