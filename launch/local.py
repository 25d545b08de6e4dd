"""Run N JAX processes on this machine (CPU devices, coordinator on loopback): multi-process training without a cluster.

    python launch/local.py --num-processes 2 --devices-per-process 4 --config configs/demo/clip_tiny.yaml \\
        --workdir runs/demo_2proc train.steps=50
    python launch/local.py -n 2 -- python -c 'import os; print(os.environ["JAX_PROCESS_ID"])'
    python launch/local.py -n 2 --config configs/demo/clip_tiny.yaml --dry-run

Process i gets JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT, JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i, JAX_PLATFORMS=cpu,
PYTHONUNBUFFERED=1 and, with --devices-per-process D, XLA_FLAGS=--xla_force_host_platform_device_count=D (after any
XLA_FLAGS already set). It runs the train command, or the command given after `--`. Each output line is printed
with an `[i] ` prefix. When a process fails the others are stopped and its exit code is returned (0 when all
succeed). A process that exits with 75 (preempted: it checkpointed and stopped on SIGTERM / SIGINT) is not a failure:
the launcher waits for the others, which stop at the same step, and returns 75. SIGTERM or SIGINT (Ctrl-C) to the
launcher is passed on to every process once per signal received (the processes run in their own session, so a
terminal's Ctrl-C reaches them only this way): the first makes them checkpoint and stop, a second stops them at once.
--dry-run prints each process's environment and command as a shell line instead.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as `python launch/local.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.common import (  # noqa: E402
    LaunchError,
    add_train_arguments,
    int_in,
    parse_with_overrides,
    report,
    train_command,
)


def process_env(index: int, args: argparse.Namespace) -> dict[str, str]:
    """The variables process `index` gets on top of this environment."""
    env = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{args.port}", "JAX_NUM_PROCESSES": str(args.num_processes),
           "JAX_PROCESS_ID": str(index), "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    if args.devices_per_process:
        flag = f"--xla_force_host_platform_device_count={args.devices_per_process}"
        env["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), flag]))
    return env


def shell_line(env: dict[str, str], command: Sequence[str]) -> str:
    """`K=V ... command`, quoted for a POSIX shell."""
    return " ".join([*(f"{key}={shlex.quote(value)}" for key, value in env.items()), shlex.join(command)])


def forward(index: int, stream, lock: threading.Lock) -> None:
    """Copies a process's output to stdout, one `[index] ` prefixed line at a time."""
    for line in stream:
        text = line if line.endswith("\n") else line + "\n"
        with lock:
            sys.stdout.write(f"[{index}] {text}")
            sys.stdout.flush()


def start(command: Sequence[str], envs: list[dict[str, str]]) -> tuple[list[subprocess.Popen], list[threading.Thread]]:
    lock, procs, threads = threading.Lock(), [], []
    for index, env in enumerate(envs):
        try:
            proc = subprocess.Popen(command, env={**os.environ, **env}, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
        except FileNotFoundError:
            stop(procs)
            raise LaunchError(f"{command[0]}: command not found", 127) from None
        procs.append(proc)
        threads.append(threading.Thread(target=forward, args=(index, proc.stdout, lock), daemon=True))
        threads[-1].start()
    return procs, threads


def stop(procs: Sequence[subprocess.Popen], grace: float = 10.0) -> None:
    """Terminates the processes still running, then kills those that outlive the grace period."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


EXIT_PREEMPTED = 75  # jaxretrieval.errors.EXIT_PREEMPTED: checkpointed and stopped, rerun to resume


def wait_first_failure(procs: Sequence[subprocess.Popen], poll: float = 0.05) -> int:
    """Waits for every process; at the first failing exit, stops the rest and returns that code (0: all ok, 75: all
    ended, some preempted)."""
    while True:
        codes = [proc.poll() for proc in procs]
        failed = [(index, code) for index, code in enumerate(codes) if code not in (None, 0, EXIT_PREEMPTED)]
        if failed:
            index, code = failed[0]
            print(f"[launch] process {index} exited with code {code}; stopping the others", file=sys.stderr)
            stop(procs)
            return code if code > 0 else 128 - code  # killed by signal -code: 128 + signal, as a shell reports
        if all(code is not None for code in codes):
            return EXIT_PREEMPTED if EXIT_PREEMPTED in codes else 0
        time.sleep(poll)


def pass_on_signals(procs: Sequence[subprocess.Popen]) -> dict[int, object]:
    """SIGTERM / SIGINT to the launcher: the same signal to every process still running. Returns the handlers it
    replaced."""
    def handler(signum: int, frame: object) -> None:
        print(f"[launch] {signal.Signals(signum).name}: passing it on to the processes", file=sys.stderr)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    return {signum: signal.signal(signum, handler) for signum in (signal.SIGTERM, signal.SIGINT)}


def launch(command: Sequence[str], envs: list[dict[str, str]]) -> int:
    """Starts one process per environment, forwards their output, and returns the first failure's exit code."""
    procs, threads = start(command, envs)
    previous = pass_on_signals(procs)
    try:
        code = wait_first_failure(procs)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    for thread in threads:
        thread.join(timeout=5)
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python launch/local.py", description=__doc__.split("\n")[0],
                                     usage="%(prog)s [options] (--config FILE [--workdir DIR] [key.path=value ...] "
                                           "| -- COMMAND ...)",
                                     epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("-n", "--num-processes", type=int_in(1), default=2, help="processes to start (default: 2)")
    parser.add_argument("--devices-per-process", type=int_in(1), help="CPU devices each process sees")
    parser.add_argument("--port", type=int_in(1024, 65535), default=8476, help="coordinator port (default: 8476)")
    parser.add_argument("--dry-run", action="store_true", help="print each process's environment and command")
    add_train_arguments(parser, python=sys.executable, config_required=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = build_parser()
    args = parse_with_overrides(parser, argv[:split])
    command = argv[split + 1:]
    if command and (args.config or args.workdir or args.overrides):
        parser.error("give either --config [--workdir] [overrides] or a command after --, not both")
    if not command and not args.config:
        parser.error("the following arguments are required: --config (or a command after --)")
    command = command or train_command(args.python, args.config, args.workdir, args.overrides)
    envs = [process_env(index, args) for index in range(args.num_processes)]
    if args.dry_run:
        for env in envs:
            print(shell_line(env, command))
        return 0
    try:
        return launch(command, envs)
    except LaunchError as e:
        return report(e)


if __name__ == "__main__":
    sys.exit(main())
