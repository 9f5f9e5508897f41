#!/usr/bin/env bash
# Run a long benchmark (e.g. paper_all.sh, ~20 minutes) on a host where each command may run
# only a few minutes: start it in its own process session, so it outlives the command that
# started it, and wait for it in later commands.
#
# usage: clients/bench/gpu/detached.sh start DIR CMD [ARGS...]
#          runs CMD in a new session from the current folder; DIR/log gets its output,
#          DIR/pid its process id, DIR/rc its exit status when it ends
#        clients/bench/gpu/detached.sh wait DIR [SECONDS]
#          waits up to SECONDS (default 540) for it; prints the log's last lines and exits 0
#          when it has ended (its status is in DIR/rc), 3 while it still runs, 1 when DIR
#          holds no run
set -uo pipefail
what=${1:-}
dir=${2:-}
if [[ -z $dir || ($what != start && $what != wait) ]]; then
  sed -n '6,12p' "$0" >&2
  exit 2
fi
case $what in
  start)
    shift 2
    (($#)) || { echo "detached.sh start: no command given" >&2; exit 2; }
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    if [[ -f $dir/pid && ! -f $dir/rc ]] && kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
      echo "detached.sh: a run in $dir is still going (pid $(cat "$dir/pid"))" >&2
      exit 1
    fi
    rm -f "$dir/rc" "$dir/log"
    # the quoted command runs in a new session; its status lands in rc when it ends
    # (no inherited stdout/stderr: a caller reading them would wait for the whole run)
    setsid bash -c '"$@" > "$0/log" 2>&1; echo $? > "$0/rc"' "$dir" "$@" < /dev/null > /dev/null 2>&1 &
    echo $! > "$dir/pid"
    echo "detached.sh: started pid $(cat "$dir/pid"), log $dir/log"
    ;;
  wait)
    [[ -f $dir/pid ]] || { echo "detached.sh wait: no run in $dir" >&2; exit 1; }
    limit=${3:-540}
    start=$(date +%s)
    while [[ ! -f $dir/rc ]] && (($(date +%s) - start < limit)); do
      sleep 2
    done
    tail -n 20 "$dir/log" 2>/dev/null
    if [[ -f $dir/rc ]]; then
      echo "detached.sh: ended with status $(cat "$dir/rc")"
      exit 0
    fi
    echo "detached.sh: still running after $limit s (pid $(cat "$dir/pid"))"
    exit 3
    ;;
esac
