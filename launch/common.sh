# shellcheck shell=bash
# Helpers shared by the launchers in launch/ (sourced, never run).
#
# Why one file: every launcher must (1) print exactly the commands it would run when asked
# for a dry run, (2) fail on bad flags with a message that names the flag, and (3) build the
# same `python -m derta_jax.train` command line with the same quoting, whether it then goes
# through `gcloud ... ssh --command`, `xpk --command` or `srun`. Keeping these here means a
# quoting fix lands in every launcher at once.

# jax[tpu] / jax[cuda12] must match the jax pin in requirements.txt (a test checks it).
# GCS_PACKAGES: Orbax reaches gs:// directories through etils.epath, whose gs backend is
# fsspec's gcsfs (not in requirements.txt, which is the CPU set).
# shellcheck disable=SC2034  # read by the launchers that source this file
JAX_VERSION=0.10.2
# shellcheck disable=SC2034
GCS_PACKAGES=gcsfs==2026.10.1
DRY_RUN=${DRY_RUN:-0}
LAUNCHER=${LAUNCHER:-$(basename "$0")}

die() {
  echo "$LAUNCHER: error: $*" >&2
  exit 2
}

# Empty arrays under `set -u` need bash >= 4.4 (macOS ships 3.2: `brew install bash`).
((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] >= 404)) || die "needs bash >= 4.4, this is $BASH_VERSION"

# note MESSAGE: a comment line; on stdout in a dry run (so the output stays a valid script).
note() {
  if [[ $DRY_RUN == 1 ]]; then echo "# $*"; else echo "[$LAUNCHER] $*" >&2; fi
}

# shell_quote WORD: WORD as one POSIX-shell word; bare when it has no special characters,
# and `--flag='value'` rather than `'--flag=value'` so printed commands read naturally.
shell_quote() {
  local word=$1 escaped_quote="'\\''"
  if [[ $word =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$word"
  elif [[ $word =~ ^(--?[A-Za-z0-9_.-]+=)(.*)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    shell_quote "${BASH_REMATCH[2]}"
  else
    printf "'%s'" "${word//\'/$escaped_quote}"
  fi
}

# quote_words WORD...: the words joined by spaces, each quoted for a shell.
quote_words() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(shell_quote "$word")"
  done
  printf '%s' "$out"
}

# run CMD ARGS...: print the command (dry run) or show it on stderr and execute it.
run() {
  if [[ $DRY_RUN == 1 ]]; then
    quote_words "$@"
    echo
  else
    echo "+ $(quote_words "$@")" >&2
    "$@"
  fi
}

# require FLAG VALUE: die unless VALUE is non-empty.
require() {
  [[ -n $2 ]] || die "missing required flag $1 (see --help)"
}

# require_shared FLAG VALUE: every host writes its shards of one Orbax checkpoint, so the
# workdir is on GCS, or an absolute path that must be the same shared mount on every host.
require_shared() {
  case $2 in
    gs://?*) ;;
    /*) note "$1=$2 is not gs://: it must be one filesystem mounted at that path on every host" ;;
    *) die "$1=$2: must be a gs:// path, or an absolute path on a filesystem shared by all hosts" ;;
  esac
}

# check_overrides ARG...: trainer overrides must be --config.a.b=value and must not set the workdir.
check_overrides() {
  local arg
  for arg in "$@"; do
    [[ $arg == --config.?*=* ]] || die "trainer override '$arg' after -- must look like --config.a.b=value"
    [[ $arg != --config.workdir=* ]] || die "trainer override '$arg': give the workdir with --workdir instead"
  done
}

# train_argv CONFIG WORKDIR [OVERRIDE...]: sets TRAIN_ARGV to the trainer's arguments (after
# the python binary). The trainer's distributed.initialize=auto calls
# jax.distributed.initialize() when it sees several processes (a TPU VM slice's metadata,
# the GKE/megascale environment, an srun step with several tasks) and skips it on one host;
# the user's overrides come last, so they win.
train_argv() {
  TRAIN_ARGV=(-m derta_jax.train "--config=$1" "--config.workdir=$2" "${@:3}")
}

# train_command PYTHON CONFIG WORKDIR [OVERRIDE...]: the trainer command as one string for a
# remote shell. PYTHON comes from the launcher itself and is inserted unquoted (so
# `~/venv/bin/python` expands on the host that runs it); every other word is quoted.
train_command() {
  local python=$1
  shift
  train_argv "$@"
  printf '%s ' "$python"
  quote_words "${TRAIN_ARGV[@]}"
}

# repo_root: the checkout these scripts live in.
repo_root() {
  (cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
}
