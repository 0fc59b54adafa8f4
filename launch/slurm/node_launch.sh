#!/bin/bash
# One node's part of launch/slurm/train.sbatch: runs the torchrun agent given as arguments and
# passes SLURM's time-limit / preemption warning (SIGUSR1) on to the agent's training ranks.
#
#   srun ... bash launch/slurm/node_launch.sh \
#       python -m torch.distributed.run ... launch/pretrain_sft.py ...
#
# Why not run torchrun directly under srun:
# - torchrun older than 2.9 has no handler for SIGUSR1, so the signal kills the agent; srun then
#   sees the task end and SLURM kills the step while the ranks are still saving. Here the agent
#   ignores SIGUSR1 and the ranks get it.
# - With SLURM's cgroup process tracking every process of the step gets srun's signals; with
#   other tracking only the task (this script) does. Forwarding from here covers both; a rank
#   that gets the signal twice just sets its stop flag twice.
# - A rank still starting up has no handler yet (it inherits the agent's "ignore", so the signal
#   cannot kill it); the signal is sent again every MSWIFT_SIGNAL_RESEND_S seconds (default 10)
#   until the agent exits, so such a rank still gets it once its handler is in place.
set -euo pipefail

resend_s=${MSWIFT_SIGNAL_RESEND_S:-10}
usr1=0
trap 'usr1=1' USR1
# SLURM sends TERM to every process of the step at the end of a job; torchrun passes it on to
# the ranks itself. This script only has to stay alive until the agent is done.
trap ':' TERM

if (($# == 0)); then
    echo "node_launch.sh: expected the torchrun command line as arguments" >&2
    exit 2
fi

(
    trap '' USR1 # the agent (and, until they install a handler, its ranks) ignore USR1
    exec "$@"
) &
agent=$!

forward_usr1() {
    local ranks=()
    # The ranks are the agent's direct children (each in a session of its own).
    if command -v pgrep >/dev/null; then
        mapfile -t ranks < <(pgrep -P "$agent" || true)
    else # a container without procps
        read -r -a ranks <"/proc/$agent/task/$agent/children" || true
    fi
    if ((${#ranks[@]} > 0)); then
        if ((last_sent < 0)); then
            echo "node_launch.sh on ${HOSTNAME:-?}: SIGUSR1 -> ranks ${ranks[*]}" >&2
        fi
        kill -USR1 "${ranks[@]}" 2>/dev/null || true
    fi
}

last_sent=-1
while kill -0 "$agent" 2>/dev/null; do
    if ((usr1)) && ((last_sent < 0 || SECONDS - last_sent >= resend_s)); then
        forward_usr1
        last_sent=$SECONDS
    fi
    sleep 1 &
    wait $! || true # a trapped signal ends the wait early; the loop handles it
done

rc=0
wait "$agent" || rc=$?
exit "$rc"
