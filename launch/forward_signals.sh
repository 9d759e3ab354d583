#!/usr/bin/env bash
# Run a launcher (accelerate launch, torchrun) and hand SIGTERM, SIGUSR1 and SIGINT to the
# trainer processes it started, as SIGTERM: "save a checkpoint and exit".
#
#   launch/forward_signals.sh accelerate launch ... train.py [hydra overrides]
#
# Why not leave it to the launcher: torchrun's agent (which `accelerate launch --multi_gpu`
# runs) answers SIGTERM by signalling the workers and SIGKILLing them 30 s later, which can
# cut a checkpoint short, and SIGUSR1 (what `sbatch --signal=USR1@...` sends before the time
# limit) simply kills the agent and orphans the workers. The trainers are the launcher's
# direct children (torchrun gives each its own session), so they are signalled directly;
# the launcher then sees them exit and returns their status. SIGUSR1 arrives as SIGTERM so
# that the trainer's one handler covers preemption and the time limit alike.
set -u

"$@" &
launcher=$!
interrupted=0

forward() {
  interrupted=1
  echo "forward_signals: $1 -> SIGTERM to the trainers of launcher $launcher" >&2
  # No children yet (still starting up): stop the launcher itself.
  pkill -TERM -P "$launcher" || kill -TERM "$launcher" 2>/dev/null || true
}
trap 'forward SIGTERM' TERM
trap 'forward SIGUSR1' USR1
# Ctrl-C: a background launcher starts with SIGINT ignored (bash does that in scripts).
trap 'forward SIGINT' INT

# `wait` returns early (status > 128) when a trapped signal arrives; wait again for the
# launcher's real exit status.
while :; do
  interrupted=0
  wait "$launcher"
  status=$?
  if [ "$interrupted" = 0 ] || [ "$status" -le 128 ]; then
    break
  fi
done
exit "$status"
