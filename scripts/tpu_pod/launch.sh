#!/usr/bin/env bash
# Run one wdjax command on every worker of a Cloud TPU VM pod slice.
#
#   scripts/tpu_pod/launch.sh --name wdjax-v4 --zone us-central2-b --type v4-32 \
#       -- wdjax distill ws:gpu --set workdir=/mnt/shared/runs/rt_mpnet
#
# 1. creates the TPU VM slice, or reuses it when it exists;
# 2. installs wdjax (this repository, --repo/--ref) and jax[tpu] on every worker;
# 3. starts the command on all workers at once (gcloud ... ssh --worker=all), adding
#    --distributed: jax.distributed.initialize() finds the other workers by itself on TPU.
# The workdir must be storage every worker sees (a GCS Fuse or NFS mount): Orbax writes one
# checkpoint from all workers, process 0 exports, the others read its export.
# --dry-run prints the gcloud commands instead of running them.
set -euo pipefail

NAME="" ZONE="" TYPE="v4-32" VERSION="tpu-ubuntu2204-base" PROJECT=""
REPO="https://github.com/wdjax/wdjax.git" REF="main" DRY=0
usage() { sed -n '2,16p' "$0"; exit 2; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --type) TYPE="$2"; shift 2 ;;
    --version) VERSION="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --repo) REPO="$2"; shift 2 ;;
    --ref) REF="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) echo "launch.sh: unknown option $1" >&2; usage ;;
  esac
done
[[ -n "$NAME" && -n "$ZONE" && $# -gt 0 && "$1" == "wdjax" ]] || {
  echo "launch.sh: need --name, --zone and a command after -- that starts with wdjax" >&2; exit 2; }

CMD="$(printf '%q ' "$@") --distributed"
TPU=(gcloud compute tpus tpu-vm)
where=(--zone "$ZONE")
[[ -n "$PROJECT" ]] && where+=(--project "$PROJECT")
run() { if [[ $DRY == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi; }

if [[ $DRY == 1 ]] || ! "${TPU[@]}" describe "$NAME" "${where[@]}" >/dev/null 2>&1; then
  run "${TPU[@]}" create "$NAME" "${where[@]}" --accelerator-type "$TYPE" --version "$VERSION"
fi
INSTALL="set -e; if [ -d wdjax ]; then git -C wdjax fetch -q && git -C wdjax checkout -q $REF; \
else git clone -q $REPO wdjax && git -C wdjax checkout -q $REF; fi; \
pip install -q -U 'jax[tpu]' && pip install -q -e ./wdjax"
run "${TPU[@]}" ssh "$NAME" "${where[@]}" --worker=all --command "$INSTALL"
run "${TPU[@]}" ssh "$NAME" "${where[@]}" --worker=all --command "cd wdjax && $CMD"
