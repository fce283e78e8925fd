#!/usr/bin/env bash
# Run one wdjax command as one process per GPU host, over ssh.
#
#   scripts/gpu_hosts/launch.sh --hosts hosts.txt [--port 12355] [--dir ~/wdjax] \
#       -- wdjax distill ws:gpu --set workdir=/shared/runs/rt_mpnet
#
# hosts.txt: one ssh destination per line; the first is process 0 and the coordinator. Each
# host needs wdjax installed in --dir (pip install -e '.[torch]' plus a CUDA jax) and all its
# GPUs visible; the workdir must be a filesystem every host sees (NFS, Lustre, a Fuse mount).
# Every process gets --coordinator FIRST_HOST:PORT --num-processes N --process-id I. Ctrl-C
# stops them all. --dry-run prints the ssh commands instead of running them.
set -euo pipefail

HOSTS="" PORT=12355 DIR="wdjax" DRY=0
usage() { sed -n '2,13p' "$0"; exit 2; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --hosts) HOSTS="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --dir) DIR="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) echo "launch.sh: unknown option $1" >&2; usage ;;
  esac
done
[[ -f "$HOSTS" && $# -gt 0 && "$1" == "wdjax" ]] || {
  echo "launch.sh: need --hosts FILE and a command after -- that starts with wdjax" >&2; exit 2; }

mapfile -t hosts < <(grep -v '^\s*\(#\|$\)' "$HOSTS")
n=${#hosts[@]}
coordinator="${hosts[0]#*@}:$PORT"
CMD="$(printf '%q ' "$@")"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
for i in "${!hosts[@]}"; do
  remote="cd $DIR && $CMD --coordinator $coordinator --num-processes $n --process-id $i"
  if [[ $DRY == 1 ]]; then
    printf 'ssh %q %q\n' "${hosts[$i]}" "$remote"
  else
    ssh "${hosts[$i]}" "$remote" 2>&1 | sed "s/^/[$i] /" &
    pids+=($!)
  fi
done
[[ $DRY == 1 ]] || wait
