"""Train on a Cloud TPU VM or pod slice with gcloud: create, setup, run, logs, delete, or all of them in a row.

    python launch/tpu_pod.py create my-pod --zone us-central2-b --accelerator-type v4-32 --spot
    python launch/tpu_pod.py setup my-pod --zone us-central2-b          # git archive of HEAD -> every worker
    python launch/tpu_pod.py run my-pod --zone us-central2-b --config configs/clip/vit_b32_finetune.yaml \\
        --workdir gs://my-bucket/runs/vit_b32 train.steps=10000
    python launch/tpu_pod.py logs my-pod --zone us-central2-b --accelerator-type v4-32   # -> logs/my-pod/
    python launch/tpu_pod.py delete my-pod --zone us-central2-b
    python launch/tpu_pod.py all my-pod --zone us-central2-b --accelerator-type v4-32 --config ... --dry-run

`setup` copies a `git archive` of --ref (default HEAD: commit first, uncommitted changes are not copied) to every
worker, or with --repo-url clones that repository there, then runs `pip install -e ".[tpu]"` on all workers.
The TPU VM image's Python must be >= 3.11 (pass --python python3.11 if it is not the default python3).
`run` starts the trainer on all workers at once (`--worker=all`); each worker tees its output to --log-file in
--remote-dir, and `logs` fetches them one worker at a time. --config is a path inside this repository (it is
read from the copy on the workers). --dry-run prints the gcloud commands instead of running them.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as `python launch/tpu_pod.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.common import (  # noqa: E402
    REPO,
    LaunchError,
    add_train_arguments,
    int_in,
    matching,
    parse_with_overrides,
    report,
    run_commands,
    train_command,
)

TPU = ["gcloud", "compute", "tpus", "tpu-vm"]
ACCELERATOR = r"(v2|v3|v4|v5p|v5litepod|v6e)-([1-9][0-9]*)"
RUNTIMES = {"v5p": "v2-alpha-tpuv5", "v5litepod": "v2-alpha-tpuv5-lite", "v6e": "v2-alpha-tpuv6e"}
DEFAULT_RUNTIME = "tpu-ubuntu2204-base"  # v2, v3, v4
REMOTE_ARCHIVE = "jaxretrieval-code.tar.gz"
STEPS = ("create", "setup", "run", "logs", "delete")


def workers(accelerator_type: str) -> int:
    """Hosts in a slice: v2/v3/v4/v5p count TensorCores (8 per host), v5litepod/v6e count chips (4 per host
    in a multi-host slice, up to 8 on one host)."""
    generation, size = re.fullmatch(ACCELERATOR, accelerator_type).groups()
    if generation in ("v5litepod", "v6e"):
        return 1 if int(size) <= 8 else int(size) // 4
    return max(1, int(size) // 8)


def gcloud(args: argparse.Namespace, verb: str, *rest: str) -> list[str]:
    """`gcloud compute tpus tpu-vm VERB ... --zone Z [--project P]`."""
    project = ["--project", args.project] if args.project else []
    return [*TPU, verb, *rest, "--zone", args.zone, *project]


def ssh_all(args: argparse.Namespace, command: str) -> list[str]:
    """`gcloud ... ssh NAME --worker=all --command COMMAND`: COMMAND runs in each worker's login shell."""
    return gcloud(args, "ssh", args.name) + ["--worker=all", "--command", command]


def create_step(args: argparse.Namespace) -> list[list[str]]:
    version = args.version or RUNTIMES.get(args.accelerator_type.split("-")[0], DEFAULT_RUNTIME)
    billing = ["--spot"] if args.spot else ["--preemptible"] if args.preemptible else []
    return [gcloud(args, "create", args.name) + ["--accelerator-type", args.accelerator_type, "--version", version]
            + billing]


def setup_step(args: argparse.Namespace) -> list[list[str]]:
    directory, install = shlex.quote(args.remote_dir), f'{shlex.quote(args.python)} -m pip install -e ".[tpu]"'
    if args.repo_url:
        url, ref = shlex.quote(args.repo_url), shlex.quote(args.ref)
        fetch = (f"(test -d {directory}/.git || git clone {url} {directory}) && cd {directory}"
                 f" && git fetch --quiet origin {ref} && git checkout --quiet --force FETCH_HEAD")
        return [ssh_all(args, f"{fetch} && {install}")]
    archive = f"/tmp/{args.name}-code.tar.gz"
    unpack = f"mkdir -p {directory} && tar -xzf {REMOTE_ARCHIVE} -C {directory} && cd {directory}"
    return [["git", "-C", str(REPO), "archive", "--format=tar.gz", "-o", archive, args.ref],
            gcloud(args, "scp", archive, f"{args.name}:{REMOTE_ARCHIVE}") + ["--worker=all"],
            ssh_all(args, f"{unpack} && {install}")]


def run_step(args: argparse.Namespace) -> list[list[str]]:
    # Every worker is one process of the job; jax finds the pod's coordinator and process ids itself.
    overrides = ["distributed.initialize=always", *args.overrides]
    train = shlex.join(train_command(args.python, args.config, args.workdir, overrides))
    log = shlex.quote(args.log_file)
    return [ssh_all(args, f"cd {shlex.quote(args.remote_dir)} && set -o pipefail && {train} 2>&1 | tee {log}")]


def logs_step(args: argparse.Namespace) -> list[list[str]]:
    local_dir = args.local_dir or f"logs/{args.name}"
    remote = f"{args.name}:{args.remote_dir}/{args.log_file}"
    return [["mkdir", "-p", local_dir]] + [
        gcloud(args, "scp", remote, f"{local_dir}/worker-{i}.log") + [f"--worker={i}"] for i in range(args.workers)]


def delete_step(args: argparse.Namespace) -> list[list[str]]:
    return [gcloud(args, "delete", args.name) + ["--quiet"]]


STEP_COMMANDS = {"create": create_step, "setup": setup_step, "run": run_step, "logs": logs_step,
                 "delete": delete_step}


NAME = r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?"
ZONE = r"[a-z]+-[a-z]+[0-9]+-[a-z]"
PROJECT = r"([a-z0-9.-]+:)?[a-z][-a-z0-9]{4,28}[a-z0-9]"


def tpu_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", type=matching(NAME, "TPU name", "my-pod-1"),
                        help="TPU VM name: lowercase letters, digits and hyphens, starting with a letter, <= 63")
    parser.add_argument("--zone", required=True, type=matching(ZONE, "zone", "us-central2-b"))
    parser.add_argument("--project", type=matching(PROJECT, "project id", "my-project"),
                        help="default: gcloud's configured project")
    parser.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")


def accelerator_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--accelerator-type", type=matching(ACCELERATOR, "accelerator type", "v4-32, v5litepod-16"),
                        help="v2-8, v3-32, v4-64, v5litepod-16, v5p-128, v6e-8, ...")


def machine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", type=matching(r"[a-z0-9][-a-z0-9.]*", "runtime version", DEFAULT_RUNTIME),
                        help=f"TPU runtime (default: {DEFAULT_RUNTIME} up to v4, "
                        + ", ".join(f"{runtime} for {gen}" for gen, runtime in RUNTIMES.items()) + ")")
    billing = parser.add_mutually_exclusive_group()
    billing.add_argument("--spot", action="store_true", help="spot VM")
    billing.add_argument("--preemptible", action="store_true", help="preemptible VM")


def remote_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--remote-dir", default="jaxretrieval", type=matching(r"[\w./-]+", "remote folder", "code"),
                        help="code folder on the workers, relative to the home folder (default: jaxretrieval)")
    parser.add_argument("--log-file", default="train.log", type=matching(r"[\w.-]+", "log file name", "train.log"),
                        help="each worker's log, in --remote-dir (default: train.log)")


def code_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo-url", help="clone this git repository on the workers instead of copying this one")
    parser.add_argument("--ref", default="HEAD", type=matching(r"[\w./^~-]+", "git ref", "main"),
                        help="commit, branch or tag to copy or check out (default: HEAD)")


def fetch_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int_in(1), help="number of workers (default: from --accelerator-type)")
    parser.add_argument("--local-dir", help="where logs go: LOCAL_DIR/worker-I.log (default: logs/NAME)")


def setup_only_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--python", default="python3", help="Python interpreter on the workers (default: python3)")


def train_options(parser: argparse.ArgumentParser) -> None:
    add_train_arguments(parser, python="python3")


def all_only_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keep", action="store_true", help="leave the TPU VM up at the end (no delete)")


SUBCOMMANDS = {
    "create": ("create the TPU VM", [tpu_options, accelerator_options, machine_options]),
    "setup": ("copy or clone the code on every worker and pip install it",
              [tpu_options, remote_options, code_options, setup_only_options]),
    "run": ("run the train command on all workers, each tee'ing its output to --log-file",
            [tpu_options, remote_options, train_options]),
    "logs": ("fetch each worker's log file", [tpu_options, accelerator_options, remote_options, fetch_options]),
    "delete": ("delete the TPU VM", [tpu_options]),
    "all": ("create, setup, run, logs and delete in a row",
            [tpu_options, accelerator_options, machine_options, remote_options, code_options, fetch_options,
             train_options, all_only_options]),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python launch/tpu_pod.py", description=__doc__.split("\n")[0],
                                     epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawTextHelpFormatter)
    subparsers = parser.add_subparsers(dest="step", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for step, (help_text, option_groups) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(step, help=help_text, description=help_text)
        for add_options in option_groups:
            add_options(sub)
    return parser


def check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Checks that depend on the subcommand; fills args.workers and makes --config relative to the repository."""
    if args.step in ("create", "all") and not args.accelerator_type:
        parser.error(f"{args.step} needs --accelerator-type")
    if args.step in ("logs", "all") and args.workers is None:
        if not args.accelerator_type:
            parser.error("logs needs --workers or --accelerator-type")
        args.workers = workers(args.accelerator_type)
    if getattr(args, "config", None):
        config = Path(args.config).resolve()
        if not config.is_relative_to(REPO):
            parser.error(f"argument --config: {args.config!r} is outside the repository {REPO}; the workers read "
                         "it from their copy of the repository")
        args.config = config.relative_to(REPO).as_posix()


def warn_if_dirty(args: argparse.Namespace) -> None:
    if args.step in ("setup", "all") and not args.repo_url and args.ref == "HEAD":
        status = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True)
        if status.stdout.strip():
            print(f"warning: {REPO} has uncommitted changes; setup copies HEAD without them", file=sys.stderr)


def execute(args: argparse.Namespace) -> None:
    """Runs (or prints) the commands of each step; a failure after create says how to delete the TPU VM."""
    steps = [args.step] if args.step != "all" else [s for s in STEPS if not (s == "delete" and args.keep)]
    for step in steps:
        try:
            run_commands(STEP_COMMANDS[step](args), args.dry_run)
        except LaunchError as e:
            if step not in ("create", "delete"):
                delete = shlex.join(delete_step(args)[0])
                raise LaunchError(f"{e}\n{args.step} stopped at {step}; the TPU VM {args.name} may still be up: "
                                  f"delete it with\n  {delete}", e.code) from None
            raise


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parse_with_overrides(parser, argv)
    check(parser, args)
    try:
        if not args.dry_run:
            warn_if_dirty(args)
        execute(args)
    except LaunchError as e:
        return report(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
