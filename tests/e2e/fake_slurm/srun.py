"""A stand-in for SLURM's ``srun`` on one machine, for tests of launch/slurm/train.sbatch.

SLURM cannot run here, so this runs the step's command once per "node" on this machine, each
copy in a session of its own with the SLURM variables a real task gets, and forwards USR1 /
TERM / INT to each copy's main process only (the weakest of SLURM's process-tracking modes: with
cgroup tracking real SLURM signals every process of the step). With ``--kill-on-bad-exit=1``
a failing copy stops the others. Its exit status is the first non-zero one, else 0.

Only the ``--option=value`` form is accepted (train.sbatch uses it): anything else fails loudly
rather than being misread. Every call is appended to $FAKE_SLURM_LOG as one JSON line.
"""
import json
import os
import signal
import subprocess
import sys
import time

import psutil


def parse(argv):
    opts, i = {}, 0
    while i < len(argv) and argv[i].startswith("-"):
        key, sep, value = argv[i].partition("=")
        if not sep:
            sys.exit(f"fake srun: option {argv[i]!r}: only --option=value is supported")
        opts[key] = value
        i += 1
    if i == len(argv):
        sys.exit("fake srun: no command given")
    return opts, argv[i:]


def kill_tree(proc):
    try:
        procs = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def main():
    opts, cmd = parse(sys.argv[1:])
    with open(os.environ["FAKE_SLURM_LOG"], "a") as log:
        log.write(json.dumps({"cmd": "srun", "argv": sys.argv[1:]}) + "\n")
    if opts.get("--ntasks-per-node", "1") != "1":
        sys.exit("fake srun: only --ntasks-per-node=1 is supported")
    nodes = int(opts.get("--nodes", os.environ.get("SLURM_NNODES", "1")))
    tasks = []
    for node in range(nodes):
        env = {**os.environ, "SLURM_NODEID": str(node), "SLURM_PROCID": str(node),
               "SLURM_LOCALID": "0", "SLURM_NTASKS": str(nodes), "SLURM_STEP_ID": "0",
               "SLURMD_NODENAME": "localhost"}
        tasks.append(subprocess.Popen(cmd, env=env, start_new_session=True))

    def forward(signum, frame):
        for task in tasks:
            if task.poll() is None:
                try:
                    os.kill(task.pid, signum)
                except ProcessLookupError:  # ended since poll()
                    pass

    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)

    first_failure = 0
    while any(task.poll() is None for task in tasks):
        failed = [exit_status(t.returncode) for t in tasks if t.returncode not in (None, 0)]
        if failed and not first_failure:
            first_failure = failed[0]
            if opts.get("--kill-on-bad-exit") == "1":
                for task in tasks:
                    kill_tree(task)
        time.sleep(0.2)
    codes = [exit_status(t.returncode) for t in tasks]
    sys.exit(first_failure or next((c for c in codes if c != 0), 0))


def exit_status(returncode):
    """Popen's -N for "killed by signal N" as a shell reports it: 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


if __name__ == "__main__":
    main()
