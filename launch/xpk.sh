#!/usr/bin/env bash
# Launch derta_jax training as an xpk workload on a GKE cluster with TPU node pools.
#
# Why xpk: on GKE a multi-host TPU slice (and several slices) is a JobSet with one pod per
# host; xpk writes that JobSet, builds the container and queues it in Kueue. Each pod runs
# the same `python -m derta_jax.train`; the trainer sees the TPU worker and megascale
# environment that GKE sets and calls jax.distributed.initialize(), which reads it. With --max_restarts the JobSet restarts after a
# preemption and the trainer resumes from the last checkpoint in the gs:// workdir.
#
# The container is either --docker_image (prebuilt: dependencies and code in its workdir) or,
# by default, --base_docker_image plus the committed HEAD of --code_dir (xpk copies it to
# /app); then the command installs requirements.txt, jax[tpu] and gcsfs before training.
# The model: start from one converted once into the bucket (python -m derta_jax.convert
# --hf_dir=DIR --out=gs://BUCKET/models/NAME), passed after `--` as
# --config.model.init_from=gs://BUCKET/models/NAME: each worker restores only its own shards
# (BUILD.md section 4), no per-host copy of the HF weights.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: launch/xpk.sh --cluster=NAME --workload=NAME --tpu_type=TYPE --config=FILE --workdir=gs://...
                     [options] [-- --config.a.b=value ...]

Required:
  --cluster NAME           an existing xpk cluster (xpk cluster create ...)
  --workload NAME          lowercase letters, digits and '-', at most 40 characters
  --tpu_type TYPE          e.g. v5p-64, v5litepod-256, v6e-256
  --config FILE            recipe, relative to the repository root, e.g. configs/mistral7b.py
  --workdir gs://BUCKET/RUN  checkpoints, metrics, resolved config (or an absolute path on a
                           volume every pod mounts at that path)
Options:
  --num_slices N           number of TPU slices (default 1; >1 runs over the data-center network)
  --project PROJECT        GCP project (default: gcloud's configured project)
  --zone ZONE              zone of the cluster (default: gcloud's configured zone)
  --docker_image IMAGE     prebuilt image with dependencies and code (no install step)
  --base_docker_image IMG  base image for xpk to add the code to (default python:3.11)
  --code_dir DIR           checkout to ship (default: this repository; HEAD, not uncommitted edits)
  --priority P             very-low|low|medium|high|very-high (default medium)
  --max_restarts N         JobSet restarts after failures such as preemption (default 3)
  --env KEY=VALUE          environment variable for the container (repeatable)
  --dry_run                print the commands instead of running them
  -h, --help               this text
Everything after -- goes to the trainer unchanged (quoted as given).
EOF
}

CLUSTER="" WORKLOAD="" TPU_TYPE="" CONFIG="" WORKDIR="" PROJECT="" ZONE="" DOCKER_IMAGE=""
BASE_IMAGE="python:3.11" CODE_DIR="" NUM_SLICES=1 PRIORITY=medium MAX_RESTARTS=3
ENVS=() OVERRIDES=()

set_flag() {
  case $1 in
    --cluster) CLUSTER=$2 ;;
    --workload) WORKLOAD=$2 ;;
    --tpu_type) TPU_TYPE=$2 ;;
    --config) CONFIG=$2 ;;
    --workdir) WORKDIR=$2 ;;
    --project) PROJECT=$2 ;;
    --zone) ZONE=$2 ;;
    --docker_image) DOCKER_IMAGE=$2 ;;
    --base_docker_image) BASE_IMAGE=$2 ;;
    --code_dir) CODE_DIR=$2 ;;
    --num_slices) NUM_SLICES=$2 ;;
    --priority) PRIORITY=$2 ;;
    --max_restarts) MAX_RESTARTS=$2 ;;
    --env) [[ $2 == [A-Za-z_]*=* ]] || die "--env=$2: must look like KEY=VALUE"; ENVS+=(--env "$2") ;;
    *) die "unknown flag $1 (see --help)" ;;
  esac
}

while (($#)); do
  case $1 in
    --) shift; OVERRIDES=("$@"); break ;;
    -h | --help) usage; exit 0 ;;
    --dry_run) DRY_RUN=1 ;;
    --*=*) set_flag "${1%%=*}" "${1#*=}" ;;
    --*) (($# >= 2)) || die "flag $1 needs a value"; set_flag "$1" "$2"; shift ;;
    *) die "unexpected argument '$1' (trainer overrides go after --)" ;;
  esac
  shift
done

require --cluster "$CLUSTER"
require --workload "$WORKLOAD"
require --tpu_type "$TPU_TYPE"
require --config "$CONFIG"
require --workdir "$WORKDIR"
require_shared --workdir "$WORKDIR"
check_overrides "${OVERRIDES[@]}"
[[ $WORKLOAD =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ && ${#WORKLOAD} -le 40 ]] ||
  die "--workload=$WORKLOAD: lowercase letters, digits and '-', starting with a letter, at most 40 characters"
[[ $NUM_SLICES =~ ^[1-9][0-9]*$ ]] || die "--num_slices=$NUM_SLICES: must be a positive integer"
[[ $MAX_RESTARTS =~ ^[0-9]+$ ]] || die "--max_restarts=$MAX_RESTARTS: must be a non-negative integer"
[[ $PRIORITY =~ ^(very-low|low|medium|high|very-high)$ ]] ||
  die "--priority=$PRIORITY: must be one of very-low, low, medium, high, very-high"
[[ -z $DOCKER_IMAGE || -z $CODE_DIR ]] || die "--code_dir is for --base_docker_image; a --docker_image already holds the code"

XPK=(xpk workload create --cluster="$CLUSTER" --workload="$WORKLOAD" --tpu-type="$TPU_TYPE"
  --num-slices="$NUM_SLICES" --priority="$PRIORITY" --max-restarts="$MAX_RESTARTS")
[[ -z $PROJECT ]] || XPK+=(--project="$PROJECT")
[[ -z $ZONE ]] || XPK+=(--zone="$ZONE")
XPK+=("${ENVS[@]}")

TRAIN=$(train_command python "$CONFIG" "$WORKDIR" "${OVERRIDES[@]}")
if [[ -n $DOCKER_IMAGE ]]; then
  XPK+=(--docker-image="$DOCKER_IMAGE" --command="$TRAIN")
else
  CODE_DIR=${CODE_DIR:-$(repo_root)}
  [[ -f $CODE_DIR/$CONFIG ]] || die "--config=$CONFIG: no such file in $CODE_DIR"
  [[ -z $(git -C "$CODE_DIR" status --porcelain --untracked-files=no) ]] ||
    note "warning: $CODE_DIR has uncommitted changes; only the committed HEAD is shipped"
  # A clean copy of HEAD, so the image holds the code and not a local .venv or caches.
  STAGE=$(mktemp -d "${TMPDIR:-/tmp}/derta_jax_xpk.XXXXXX")
  trap 'rm -rf "$STAGE"' EXIT
  [[ $DRY_RUN != 1 ]] || note "$STAGE is a fresh temporary directory (removed on exit)"
  run git -C "$CODE_DIR" archive --format=tar --output="$STAGE/code.tar" HEAD
  run mkdir "$STAGE/app"
  run tar -xf "$STAGE/code.tar" -C "$STAGE/app"
  INSTALL="pip install -q -r requirements.txt $(shell_quote "jax[tpu]==$JAX_VERSION") $GCS_PACKAGES"
  XPK+=(--base-docker-image="$BASE_IMAGE" --script-dir="$STAGE/app" --command="$INSTALL && $TRAIN")
fi

run "${XPK[@]}"
note "follow it with: xpk workload list --cluster=$CLUSTER  (logs: kubectl logs -l jobset.sigs.k8s.io/jobset-name=$WORKLOAD)"
