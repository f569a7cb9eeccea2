#!/usr/bin/env bash
# Launch derta_jax training on a Cloud TPU VM slice (one host or a multi-host pod slice).
#
# Why a script: a pod slice has N hosts and every one must run the same trainer command at
# the same time with the same code, or jax.distributed.initialize() waits forever. This does
# the four steps in order, each through one `run` that --dry_run turns into a printout:
#   create  the TPU VM (or reuse it; --queued asks for it as a queued resource, --spot for spot)
#   copy    the code to every worker (git archive of HEAD, or git clone of --repo)
#   install python3.11 + a venv with requirements.txt, jax[tpu] and gcsfs on every worker
#   train   `python -m derta_jax.train` on every worker (--worker=all), workdir on gs://
# Re-running the same command reuses the VM and resumes from the last checkpoint in --workdir.
# The model: start from one converted once into the bucket (python -m derta_jax.convert
# --hf_dir=DIR --out=gs://BUCKET/models/NAME), passed after `--` as
# --config.model.init_from=gs://BUCKET/models/NAME: each worker restores only its own shards
# (BUILD.md section 4), no per-host copy of the HF weights.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: launch/tpu_vm.sh --name=NAME --zone=ZONE --accelerator_type=TYPE --config=FILE --workdir=gs://...
                        [options] [-- --config.a.b=value ...]

Required:
  --name NAME              TPU VM name (reused when it already exists)
  --zone ZONE              e.g. us-east5-a
  --accelerator_type TYPE  e.g. v5p-64, v5litepod-16, v6e-8, v4-32
  --config FILE            recipe, relative to the repository root, e.g. configs/mistral7b.py
  --workdir gs://BUCKET/RUN  checkpoints, metrics, resolved config (or an absolute path on a
                           filesystem every host mounts at that path)
Options:
  --project PROJECT        GCP project (default: gcloud's configured project)
  --version RUNTIME        TPU software version (default from the type: v2-alpha-tpuv5 for v5p,
                           v2-alpha-tpuv5-lite for v5e, v2-alpha-tpuv6e for v6e, else tpu-ubuntu2204-base)
  --spot                   spot capacity (cheaper, preemptible; resume is automatic on re-run)
  --queued                 create through a queued resource and wait until it is ACTIVE
  --code_dir DIR           local checkout to copy (default: this repository; HEAD, not uncommitted edits)
  --repo URL [--ref REF]   instead of copying, git clone URL (at REF) on every worker
  --steps LIST             subset of create,copy,install,train (default: all four)
  --detach                 start training under nohup (log: ~/derta_train.log) and return
  --dry_run                print the commands instead of running them
  -h, --help               this text
Everything after -- goes to the trainer unchanged (quoted as given).
EOF
}

NAME="" ZONE="" PROJECT="" ACCEL="" VERSION="" CONFIG="" WORKDIR="" CODE_DIR="" REPO="" REF=""
SPOT=0 QUEUED=0 DETACH=0 STEPS="create,copy,install,train"
OVERRIDES=()

set_flag() {
  case $1 in
    --name) NAME=$2 ;;
    --zone) ZONE=$2 ;;
    --project) PROJECT=$2 ;;
    --accelerator_type) ACCEL=$2 ;;
    --version) VERSION=$2 ;;
    --config) CONFIG=$2 ;;
    --workdir) WORKDIR=$2 ;;
    --code_dir) CODE_DIR=$2 ;;
    --repo) REPO=$2 ;;
    --ref) REF=$2 ;;
    --steps) STEPS=$2 ;;
    *) die "unknown flag $1 (see --help)" ;;
  esac
}

while (($#)); do
  case $1 in
    --) shift; OVERRIDES=("$@"); break ;;
    -h | --help) usage; exit 0 ;;
    --dry_run) DRY_RUN=1 ;;
    --spot) SPOT=1 ;;
    --queued) QUEUED=1 ;;
    --detach) DETACH=1 ;;
    --*=*) set_flag "${1%%=*}" "${1#*=}" ;;
    --*) (($# >= 2)) || die "flag $1 needs a value"; set_flag "$1" "$2"; shift ;;
    *) die "unexpected argument '$1' (trainer overrides go after --)" ;;
  esac
  shift
done

require --name "$NAME"
require --zone "$ZONE"
require --accelerator_type "$ACCEL"
require --config "$CONFIG"
require --workdir "$WORKDIR"
require_shared --workdir "$WORKDIR"
check_overrides "${OVERRIDES[@]}"
[[ -z $REPO || -z $CODE_DIR ]] || die "give either --repo or --code_dir, not both"
[[ -n $REPO || -z $REF ]] || die "--ref needs --repo"
for step in ${STEPS//,/ }; do
  [[ $step =~ ^(create|copy|install|train)$ ]] || die "--steps: unknown step '$step' (create,copy,install,train)"
done
has_step() { [[ ",$STEPS," == *",$1,"* ]]; }

if [[ -z $VERSION ]]; then
  case $ACCEL in
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) VERSION=v2-alpha-tpuv5-lite ;;
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    *) VERSION=tpu-ubuntu2204-base ;;
  esac
fi
if [[ -z $REPO ]]; then
  CODE_DIR=${CODE_DIR:-$(repo_root)}
  [[ -f $CODE_DIR/$CONFIG ]] || die "--config=$CONFIG: no such file in $CODE_DIR"
fi

LOCATION=(--zone="$ZONE")
[[ -z $PROJECT ]] || LOCATION+=(--project="$PROJECT")
CAPACITY=()
((SPOT == 0)) || CAPACITY=(--spot)
QR_NAME="$NAME-qr"

on_all_workers() {  # on_all_workers 'shell command': one ssh per worker, all in parallel
  run gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker=all --command="$1"
}

create_tpu() {
  if [[ $DRY_RUN == 1 ]]; then
    note "skipped when it exists: gcloud compute tpus tpu-vm describe $NAME $(quote_words "${LOCATION[@]}")"
  elif gcloud compute tpus tpu-vm describe "$NAME" "${LOCATION[@]}" >/dev/null 2>&1; then
    note "TPU VM $NAME exists: reusing it"
    return
  fi
  if ((QUEUED)); then
    run gcloud compute tpus queued-resources create "$QR_NAME" --node-id="$NAME" "${LOCATION[@]}" \
      --accelerator-type="$ACCEL" --runtime-version="$VERSION" "${CAPACITY[@]}"
    wait_until_active
  else
    run gcloud compute tpus tpu-vm create "$NAME" "${LOCATION[@]}" \
      --accelerator-type="$ACCEL" --version="$VERSION" "${CAPACITY[@]}"
  fi
}

wait_until_active() {
  local describe=(gcloud compute tpus queued-resources describe "$QR_NAME" "${LOCATION[@]}"
    --format='value(state.state)')
  if [[ $DRY_RUN == 1 ]]; then
    note "then wait until this prints ACTIVE: $(quote_words "${describe[@]}")"
    return
  fi
  local state
  while :; do
    state=$("${describe[@]}")
    case $state in
      ACTIVE) return ;;
      FAILED | SUSPENDED) die "queued resource $QR_NAME is $state" ;;
    esac
    note "queued resource $QR_NAME is ${state:-unknown}; checking again in ${QUEUED_POLL_SECONDS:-60} s"
    sleep "${QUEUED_POLL_SECONDS:-60}"
  done
}

copy_code() {
  if [[ -n $REPO ]]; then
    local checkout=""
    [[ -z $REF ]] || checkout=" && git -C ~/derta_jax checkout $(shell_quote "$REF")"
    on_all_workers "rm -rf ~/derta_jax && git clone $(shell_quote "$REPO") ~/derta_jax$checkout"
    return
  fi
  [[ -z $(git -C "$CODE_DIR" status --porcelain --untracked-files=no) ]] ||
    note "warning: $CODE_DIR has uncommitted changes; only the committed HEAD is copied"
  local archive
  ARCHIVE_DIR=$(mktemp -d "${TMPDIR:-/tmp}/derta_jax_launch.XXXXXX")
  trap 'rm -rf "$ARCHIVE_DIR"' EXIT
  archive=$ARCHIVE_DIR/derta_jax.tar.gz
  [[ $DRY_RUN != 1 ]] || note "$ARCHIVE_DIR is a fresh temporary directory (removed on exit)"
  run git -C "$CODE_DIR" archive --format=tar.gz --output="$archive" HEAD
  run gcloud compute tpus tpu-vm scp "$archive" "$NAME:derta_jax.tar.gz" "${LOCATION[@]}" --worker=all
  on_all_workers "rm -rf ~/derta_jax && mkdir -p ~/derta_jax && tar -xzf ~/derta_jax.tar.gz -C ~/derta_jax"
}

install_deps() {
  # Transparent hugepages: JAX warns without them on v5e and newer (slower TPU start-up).
  on_all_workers "sudo sh -c 'echo always > /sys/kernel/mm/transparent_hugepage/enabled'\
 && (command -v python3.11 >/dev/null || (sudo apt-get update -q && sudo apt-get install -yq python3.11 python3.11-venv))\
 && python3.11 -m venv ~/derta_venv && ~/derta_venv/bin/pip install -q --upgrade pip\
 && ~/derta_venv/bin/pip install -q -r ~/derta_jax/requirements.txt 'jax[tpu]==$JAX_VERSION' $GCS_PACKAGES"
}

start_training() {
  local train
  # shellcheck disable=SC2088  # the tilde is for the worker's shell, not this one
  train=$(train_command "~/derta_venv/bin/python" "$CONFIG" "$WORKDIR" "${OVERRIDES[@]}")
  if ((DETACH)); then
    on_all_workers "cd ~/derta_jax && nohup $train < /dev/null > ~/derta_train.log 2>&1 &"
  else
    on_all_workers "cd ~/derta_jax && $train"
  fi
}

! has_step create || create_tpu
! has_step copy || copy_code
! has_step install || install_deps
! has_step train || start_training
