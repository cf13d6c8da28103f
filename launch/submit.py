"""Submit the training job with submitit (``pip install -e .[launch]``): the job of ``launch/slurm/train.sbatch``
from Python.

    python launch/submit.py --nodes 4 --gpus-per-node 8 --time-min 1440 --partition gpu -- recipe=kimi_vl_a3b
    python launch/submit.py --executor local --gpus-per-node 2 -- recipe=debug     # this machine, to try it

One task per node runs ``torchrun --nnodes N --nproc_per_node G --rdzv_backend c10d`` with the rendezvous on the
first node and ``python -m train <overrides>`` as workers.

Preemption and time limits: submitit asks SLURM for its signal (USR2) ``--signal-delay-s`` before the end and, on
it, calls :meth:`TrainJob.checkpoint` in the first task. That forwards USR1 to torchrun, which forwards it to the
workers; the trainer checkpoints at its next step boundary and leaves (its ranks agree, so one node being told is
enough), and submitit requeues the job with the same command, which resumes from the checkpoint. torchrun and its
workers ignore submitit's own signal (SLURM delivers it to every process of the step, and its default action
would kill them before they could checkpoint).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import submitit

REPO = Path(__file__).resolve().parents[1]
# Signals torchrun forwards to its workers (its defaults plus the trainer's checkpoint-and-leave signal).
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def torchrun_command(overrides: list[str], nnodes: int, nproc_per_node: int, head: str, port: int, job_id: str,
                     shutdown_timeout: int, torchrun: str = "torchrun") -> list[str]:
    """The command each node runs: one torchrun agent, ``nproc_per_node`` trainer processes.

    Args:
        overrides: ``python -m train`` arguments (``recipe=...`` and ``key=value`` overrides).
        nnodes: Nodes of the job.
        nproc_per_node: Trainer processes per node (one per GPU).
        head: Host of the c10d rendezvous (the job's first node).
        port: Rendezvous port on ``head``.
        job_id: Rendezvous id (the job id: a requeued job meets again under the same id).
        shutdown_timeout: Seconds the workers get to checkpoint and leave once signalled.
        torchrun: The torchrun executable.
    """
    return [torchrun, f"--nnodes={nnodes}", f"--nproc_per_node={nproc_per_node}", "--rdzv_backend=c10d",
            f"--rdzv_endpoint={head}:{port}", f"--rdzv_id={job_id}", f"--signals_to_handle={FORWARDED_SIGNALS}",
            f"--shutdown_timeout={shutdown_timeout}", "-m", "train", *overrides]


def _ignore_preemption_signal() -> None:
    """In the torchrun child before exec: ignore submitit's signal (ignored dispositions survive exec and are
    inherited by the workers)."""
    signal.signal(getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")), signal.SIG_IGN)


class TrainJob(submitit.helpers.Checkpointable):
    """The per-node task: runs torchrun until it exits; on preemption makes the trainer checkpoint, then requeues.

    Args:
        overrides: ``python -m train`` arguments.
        gpus_per_node: Trainer processes per node.
        port: Rendezvous port.
        shutdown_timeout: Seconds granted to the workers to checkpoint once signalled (keep it below the signal
            delay).
        repo: The checkout to run in.
        torchrun: The torchrun executable (default: next to this Python).
    """

    def __init__(self, overrides: list[str], gpus_per_node: int, port: int = 29500, shutdown_timeout: int = 240,
                 repo: str = str(REPO), torchrun: str = str(Path(sys.executable).parent / "torchrun")):
        self.overrides = list(overrides)
        self.gpus_per_node = gpus_per_node
        self.port = port
        self.shutdown_timeout = shutdown_timeout
        self.repo = repo
        self.torchrun = torchrun
        self._process: subprocess.Popen | None = None

    def command(self, env: submitit.JobEnvironment) -> list[str]:
        """The torchrun command of this node, from the job's environment (nodes, first host, job id)."""
        head = "localhost" if env.num_nodes == 1 else env.hostnames[0]
        return torchrun_command(self.overrides, env.num_nodes, self.gpus_per_node, head, self.port,
                                str(env.job_id), self.shutdown_timeout, self.torchrun)

    def __call__(self) -> int:
        env = submitit.JobEnvironment()
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        self._process = subprocess.Popen(self.command(env), cwd=self.repo, preexec_fn=_ignore_preemption_signal)
        # Poll rather than wait(): checkpoint() runs in a signal handler of this thread and must be able to reap
        # the process itself (a blocking wait() would hold the Popen's lock meanwhile).
        while (code := self._process.poll()) is None:
            time.sleep(0.5)
        if code != 0:
            raise RuntimeError(f"torchrun exited with {code}: see the job's log")
        return code

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on preemption or timeout: the trainer checkpoints and leaves; the same job is
        resubmitted (it resumes from that checkpoint)."""
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGUSR1)
            deadline = time.monotonic() + self.shutdown_timeout + 30
            while process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.5)
        fresh = TrainJob(self.overrides, self.gpus_per_node, self.port, self.shutdown_timeout, self.repo,
                         self.torchrun)
        return submitit.helpers.DelayedSubmission(fresh)


def build_executor(kind: str, folder: str, nodes: int, gpus_per_node: int, time_min: int, partition: str = "",
                   signal_delay_s: int = 300, cpus_per_task: int = 0, job_name: str = "kimi-vl"
                   ) -> submitit.Executor:
    """A submitit executor for ``kind`` (``slurm``, ``local`` or ``auto``: SLURM when available, else local).

    Locally there is one node and no GPU request (``gpus_per_node`` only sets the trainer processes).
    """
    if kind not in ("auto", "slurm", "local"):
        raise ValueError(f"executor '{kind}': allowed are auto, slurm, local")
    if kind == "local" or (kind == "auto" and submitit.AutoExecutor.which() != "slurm"):
        if nodes != 1:
            raise ValueError(f"the local executor runs one node, not {nodes}")
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=time_min, tasks_per_node=1, signal_delay_s=signal_delay_s)
        return executor
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    params = {"timeout_min": time_min, "tasks_per_node": 1, "name": job_name, "nodes": nodes,
              "gpus_per_node": gpus_per_node, "slurm_signal_delay_s": signal_delay_s}
    if partition:
        params["slurm_partition"] = partition
    if cpus_per_task:
        params["cpus_per_task"] = cpus_per_task
    executor.update_parameters(**params)
    return executor


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     usage="python launch/submit.py [options] -- recipe=<name> [key=value ...]")
    parser.add_argument("--executor", default="auto", choices=("auto", "slurm", "local"))
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--time-min", type=int, default=24 * 60)
    parser.add_argument("--partition", default="")
    parser.add_argument("--cpus-per-task", type=int, default=0)
    parser.add_argument("--port", type=int, default=29500)
    parser.add_argument("--signal-delay-s", type=int, default=300)
    parser.add_argument("--shutdown-timeout", type=int, default=240)
    parser.add_argument("--folder", default="logs/submitit", help="submitit's job files and logs")
    parser.add_argument("--wait", action="store_true", help="wait for the job and print its result")
    parser.add_argument("overrides", nargs="*", help="python -m train arguments (after --)")
    args = parser.parse_args(argv)
    if not any(o.startswith("recipe=") for o in args.overrides):
        parser.error("give the recipe after --, e.g. -- recipe=debug")
    # A bad recipe fails here, before anything is queued.
    check = subprocess.run([sys.executable, "-m", "train", *args.overrides, "--print-config"], cwd=REPO,
                           capture_output=True, text=True)
    if check.returncode != 0:
        print(check.stderr, file=sys.stderr, end="")
        return 2
    executor = build_executor(args.executor, args.folder, args.nodes, args.gpus_per_node, args.time_min,
                              args.partition, args.signal_delay_s, args.cpus_per_task)
    job = executor.submit(TrainJob(args.overrides, args.gpus_per_node, args.port, args.shutdown_timeout))
    print(f"submitted job {job.job_id} ({type(executor).__name__}); logs in {args.folder}")
    if args.wait:
        print(f"result: {job.result()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
