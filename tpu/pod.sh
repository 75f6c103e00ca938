#!/usr/bin/env bash
# A Cloud TPU slice's life cycle for the distillation job: create (queued resource), stage, launch, logs, delete.
#
#   TPU=qf-v5p-16 ZONE=us-east5-a ACCELERATOR=v5p-16 bash tpu/pod.sh [--dry_run] COMMAND [-- JOB_ARGS ...]
#
#   create   queue the slice (gcloud compute tpus queued-resources create) and wait until it is ACTIVE
#   stage    copy this checkout's committed HEAD to every worker and install it with the [tpu] extra; with
#            DATA_SRC set (gs://...), also copy that data to DATA_DIR (default ~/data) on every worker
#   launch   start `python3 -m qwen_flash_jax.main --distributed JOB_ARGS` on every worker in the background,
#            one log per worker: ~/qf_logs/worker-<hostname>.log
#   logs     print the last lines of every worker's log
#   delete   delete the slice and its queued resource
#
# --dry_run prints the gcloud commands instead of running them (nothing is created, copied or started).
# Optional: RUNTIME (default: the JAX software version of the accelerator's family), PROJECT, SPOT=1.
set -euo pipefail

usage() {
  echo "usage: TPU=NAME ZONE=ZONE [ACCELERATOR=v5p-16] bash tpu/pod.sh [--dry_run] create|stage|launch|logs|delete [-- JOB_ARGS ...]" >&2
  exit 2
}

need() {
  if [ -z "${!1:-}" ]; then
    echo "error: set $1 ($2)" >&2
    exit 2
  fi
}

DRY_RUN=0
if [ "${1:-}" = "--dry_run" ]; then
  DRY_RUN=1
  shift
fi
[ $# -ge 1 ] || usage
COMMAND=$1
shift
if [ $# -ge 1 ]; then
  [ "$1" = "--" ] || usage
  shift
fi
need TPU "the slice name"
need ZONE "e.g. us-east5-a"

# Prints the command, and runs it unless --dry_run.
run() {
  printf '%q ' "$@"
  echo
  if [ "$DRY_RUN" = 0 ]; then "$@"; fi
}

project_flag=()
[ -n "${PROJECT:-}" ] && project_flag=(--project "$PROJECT")

# Every worker runs the same shell command (ssh --worker=all).
on_workers() {
  run gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" "${project_flag[@]}" --worker=all --command "$1"
}

runtime_for() {
  case $1 in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    *) echo tpu-ubuntu2204-base ;;
  esac
}

case $COMMAND in
  create)
    need ACCELERATOR "e.g. v5p-16"
    spot=()
    [ "${SPOT:-0}" = 1 ] && spot=(--spot)
    run gcloud compute tpus queued-resources create "$TPU" --node-id "$TPU" --zone "$ZONE" "${project_flag[@]}" \
      --accelerator-type "$ACCELERATOR" --runtime-version "${RUNTIME:-$(runtime_for "$ACCELERATOR")}" "${spot[@]}"
    describe=(gcloud compute tpus queued-resources describe "$TPU" --zone "$ZONE" "${project_flag[@]}"
      --format 'value(state.state)')
    if [ "$DRY_RUN" = 1 ]; then
      run "${describe[@]}"
      exit 0
    fi
    # A queued resource waits for capacity; FAILED or SUSPENDED will not become ACTIVE by waiting.
    while true; do
      state=$("${describe[@]}")
      echo "$(date -u +%H:%M:%S) $TPU: $state"
      case $state in
        ACTIVE) break ;;
        FAILED | SUSPENDED) exit 1 ;;
      esac
      sleep 60
    done
    ;;
  stage)
    # The committed HEAD, so that every worker runs the same code whatever the local work tree holds.
    archive=${TMPDIR:-/tmp}/qwen_flash_jax-$TPU.tar.gz
    run git -C "$(dirname "$0")/.." archive --format=tar.gz --output "$archive" HEAD
    run gcloud compute tpus tpu-vm scp "$archive" "$TPU:qwen_flash_jax.tar.gz" --zone "$ZONE" "${project_flag[@]}" \
      --worker=all
    on_workers "set -e; rm -rf qwen_flash_jax && mkdir qwen_flash_jax && tar -xzf qwen_flash_jax.tar.gz -C qwen_flash_jax \
&& python3 -m pip install -q -e './qwen_flash_jax[tpu]'"
    if [ -n "${DATA_SRC:-}" ]; then
      on_workers "set -e; mkdir -p ${DATA_DIR:-~/data} && gcloud storage rsync -r $(printf '%q' "$DATA_SRC") \
${DATA_DIR:-~/data}"
    fi
    ;;
  launch)
    [ $# -ge 1 ] || usage
    args=$(printf '%q ' "$@")
    # setsid + nohup: the job outlives the ssh session; each worker writes its own log.
    on_workers "set -e; mkdir -p ~/qf_logs && cd qwen_flash_jax && setsid nohup python3 -m qwen_flash_jax.main \
--distributed $args > ~/qf_logs/worker-\$(hostname).log 2>&1 < /dev/null & echo started on \$(hostname)"
    ;;
  logs)
    on_workers "tail -n ${LINES_PER_WORKER:-20} ~/qf_logs/worker-\$(hostname).log"
    ;;
  delete)
    run gcloud compute tpus queued-resources delete "$TPU" --zone "$ZONE" "${project_flag[@]}" --force --quiet
    ;;
  *) usage ;;
esac
