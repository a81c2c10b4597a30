#!/usr/bin/env bash
# Runs vidlankd_jax on Cloud TPU VMs: creates a slice (or several slices through a queued resource),
# installs the code on every worker, runs one command on all workers with a shared GCS workdir,
# shows logs, and stops or deletes the TPUs. Every gcloud call can be printed instead (--dry-run).
set -euo pipefail

PROG=$(basename "$0")
SCRIPT_DIR=$(cd "$(dirname "$0")" && pwd)
# Paths on the workers, written with '~' on purpose: the workers' shell expands them.
# shellcheck disable=SC2088
REMOTE_CODE='~/vidlankd_jax' REMOTE_LOG_DIR='~/tpu_launch_logs'
REMOTE_TARBALL=vidlankd_jax.tar.gz   # in the workers' home directory

usage() {
  cat <<EOF
Usage: $PROG [OPTIONS] COMMAND [OPTIONS] [-- CMD ARGS...]

Runs vidlankd_jax on Cloud TPU VMs with 'gcloud compute tpus tpu-vm' (one slice) or
'gcloud compute tpus queued-resources' (--num-slices > 1, multi-slice).

Commands:
  create [-- CMD]   create the TPU (reused when 'describe' finds it); multi-slice requests a
                    queued resource and waits until it is ACTIVE. CMD (not run here) is the run
                    the slice is for: the preflight plans its --config before the TPU is created
  setup             copy the code to every worker (a tarball of the git working tree, or
                    'git clone' with --repo) and install it in ~/venv with jax[tpu]
  run -- CMD...     run CMD on every worker (all slices) from the code directory in ~/venv;
                    output is streamed here and written to a local log file per run; the
                    preflight plans CMD's --config for the slice first
  logs              print the latest run's log from a worker (--follow to keep reading)
  kill              end the latest detached run on every worker
  status            describe the TPU or queued resource
  start | stop      start or stop a single-slice TPU VM
  delete            delete the TPU (multi-slice: the queued resource and its slices)

Settings (option, or environment variable):
  --name NAME               TPU_NAME          TPU (or queued resource) name          [required]
  --zone ZONE               ZONE              e.g. us-central2-b                     [required]
  --project PROJECT         PROJECT           Google Cloud project                   [required]
  --accelerator-type TYPE   ACCELERATOR_TYPE  v4-8, v4-32, v5litepod-16, v5p-8, v6e-8 ... [create]
  --runtime-version VER     RUNTIME_VERSION   default from the accelerator type: v2-alpha-tpuv6e,
                                              v2-alpha-tpuv5 (v5p), v2-alpha-tpuv5-lite (v5e),
                                              tpu-ubuntu2204-base (v4 and older)
  --num-slices N            NUM_SLICES        slices; N > 1 uses a queued resource (default 1)
  --spot | --preemptible                      create Spot (or preemptible) TPUs; queued resources
                                              take --spot only
  --repo URL [--ref REF]                      setup: clone URL (at REF) instead of copying the tree
  --python-version X.Y                        setup: Python for ~/venv, installed with apt when
                                              missing (default 3.11)
  --workdir gs://BUCKET/PATH                  run: shared workdir; exported as WORKDIR on the
                                              workers and passed to CMD as --workdir=...
  --worker N|all                              run, logs: which worker (run: all, logs: 0)
  --detach                                    run: start CMD in the background on the workers
                                              (survives a closed connection; see logs, kill)
  --follow                                    logs: keep printing new lines
  --log-dir DIR                               run: local log directory (default runs/tpu_logs)
  --yes                                       delete: do not ask for confirmation
  --no-preflight                              create, run: skip the preflight (below)
  --dry-run                                   print every command ('+ ' and shell-quoted)
                                              instead of running it
  -h, --help                                  show this text

Example: the full VidLanKD pipeline on a v4-32 pod slice.
  export TPU_NAME=vidlankd ZONE=us-central2-b PROJECT=my-project ACCELERATOR_TYPE=v4-32
  BUCKET=gs://my-bucket/vidlankd

  # 1. HowTo100M captions and extracted features -> TFRecords, and a Wikipedia dump -> 126-token
  #    blocks, then into the bucket (on any machine that holds the data; no TPU needed).
  python tools/convert_howto100m.py --caption_json caption.json \\
      --features_2d_dir howto100m_feature --features_3d_dir howto100m_feature3d \\
      --output_dir data/howto100m --workers 16
  python tools/make_text_tfrecords.py --input enwiki-latest-pages-articles.xml.bz2 \\
      --output_dir data/wikipedia --prefix wikipedia --split train --num_shards 256
  gcloud storage cp --recursive data/howto100m data/wikipedia \$BUCKET/

  # 2. Create the slice and install the code on every worker.
  ./$PROG create
  ./$PROG setup

  # 3. Teacher pretraining on video-text pairs.
  ./$PROG run --workdir \$BUCKET/teacher -- python -m vidlankd_jax.main \\
      --config=configs/teacher.py:size=base --config.data.data_dir=\$BUCKET

  # 4. Distillation into the text-only student (NST objective), and the text-only baseline.
  ./$PROG run --workdir \$BUCKET/distill_nst -- python -m vidlankd_jax.main \\
      --config=configs/distill.py:size=base,teacher_size=base,objectives=nst \\
      --config.teacher.workdir=\$BUCKET/teacher --config.data.data_dir=\$BUCKET
  ./$PROG run --workdir \$BUCKET/bert_baseline -- python -m vidlankd_jax.main \\
      --config=configs/distill.py:size=base,objectives=none --config.data.data_dir=\$BUCKET

  # 5. GLUE fine-tuning of the student (SST-2, from a prepared TFDS folder), in the background.
  ./$PROG run --detach --workdir \$BUCKET/sst2 -- python -m vidlankd_jax.main \\
      --config=configs/finetune.py:task=sst2,init=\$BUCKET/distill_nst \\
      --config.data.data_dir=\$BUCKET/tensorflow_datasets
  ./$PROG logs --follow

  # 6. Both students on several tasks, side by side (mean +- std over seeds), then delete the TPU.
  ./$PROG run --workdir \$BUCKET/compare -- python tools/compare_finetune.py \\
      --init=vidlankd=\$BUCKET/distill_nst \\
      --init=text_only=\$BUCKET/bert_baseline --tasks=sst2,qnli,qqp,mnli --seeds=1,2,3 \\
      --set=data.data_dir=\$BUCKET/tensorflow_datasets
  ./$PROG delete --yes

Preflight (create and run, on by default): when CMD has --config=configs/<stage>.py:..., the
run is planned here first for the slice's topology (ACCELERATOR_TYPE, e.g. v5litepod-16 is
v5e:4x4, v4-32 is v4:2x2x4, v5p-64 is v5p:2x4x4, v6e-256 is v6e:16x16; and --num-slices) with
'vidlankd plan' (deviceless TPU compilation: libtpu installed here, no TPU). A config that does not
fit the chips' HBM, or whose mesh the topology cannot hold, stops the command before any gcloud
call, with the plan's one-line reason and status. VIDLANKD_PLAN replaces the plan command
(default: 'python -m vidlankd_jax.cli plan', run from this directory).

Multi-slice: add '--num-slices 2' (or NUM_SLICES=2) to every command; 'create' then requests a
queued resource with --node-count=2 and 'setup', 'run', 'logs' reach every worker of every slice.
Check any command first with --dry-run.

Exit status of 'run' (the command's own, through ssh): 0 finished; 75 stopped by SIGTERM or a
preemption notice with its checkpoint kept (EX_TEMPFAIL: run the same command again, it resumes);
2 a wrong command line or config; 1 a data or storage error, or a bug (its traceback is in the
workdir's error.txt). A controller restarts while the status is 75, e.g.
  until ./$PROG run --workdir \$BUCKET/teacher -- python -m vidlankd_jax.main ...; do
    [[ \$? == 75 ]] || break; sleep 60; done
(a Kubernetes Job: a podFailurePolicy rule 'onExitCodes: {operator: In, values: [75]}' with
action Ignore restarts a preempted pod without counting it as a failure).
EOF
}

die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 2
}

note() {
  printf '%s: %s\n' "$PROG" "$*" >&2
}

# Quotes a string in single quotes, for any POSIX shell on the workers.
squote() {
  local q="'\\''"
  printf "'%s'" "${1//\'/$q}"
}

# Prints a command on one line after '+ ', quoting the words that need it.
show() {
  local line='+' word
  for word in "$@"; do
    if [[ $word =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      line+=" $word"
    else
      line+=" $(squote "$word")"
    fi
  done
  printf '%s\n' "$line"
}

# Runs a command, or only prints it under --dry-run. Real runs echo the command on stderr.
run_cmd() {
  if [[ $DRY_RUN == 1 ]]; then
    show "$@"
  else
    show "$@" >&2
    "$@"
  fi
}

# Exits with a clear message when a required setting is empty.
require() {
  local value=$1 what=$2 option=$3 env=$4
  if [[ -z $value ]]; then
    if [[ -n $env ]]; then
      die "$what is not set: pass $option or set $env"
    fi
    die "$what is not set: pass $option"
  fi
}

# The runtime (software) version recommended for an accelerator type.
default_runtime_version() {
  case $1 in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    *) return 1 ;;
  esac
}

parse_args() {
  while (($#)); do
    local arg=$1 value='' has_value
    # --option=value and --option value are both accepted.
    case $arg in
      --*=*) value=${arg#*=} arg=${arg%%=*} has_value=1 ;;
      *) has_value=0 ;;
    esac
    case $arg in
      --name | --zone | --project | --accelerator-type | --runtime-version | --num-slices | \
        --repo | --ref | --python-version | --workdir | --worker | --log-dir)
        if [[ $has_value == 0 ]]; then
          (($# >= 2)) || die "$arg needs a value"
          value=$2
          shift
        fi
        case $arg in
          --name) TPU_NAME=$value ;;
          --zone) ZONE=$value ;;
          --project) PROJECT=$value ;;
          --accelerator-type) ACCELERATOR_TYPE=$value ;;
          --runtime-version) RUNTIME_VERSION=$value ;;
          --num-slices) NUM_SLICES=$value ;;
          --repo) REPO_URL=$value ;;
          --ref) REPO_REF=$value ;;
          --python-version) PYTHON_VERSION=$value ;;
          --workdir) WORKDIR_URL=$value ;;
          --worker) WORKER=$value ;;
          --log-dir) LOG_DIR=$value ;;
        esac
        ;;
      --spot) SPOT=1 ;;
      --preemptible) PREEMPTIBLE=1 ;;
      --detach) DETACH=1 ;;
      --follow) FOLLOW=1 ;;
      --yes) ASSUME_YES=1 ;;
      --dry-run) DRY_RUN=1 ;;
      --no-preflight) PREFLIGHT=0 ;;
      -h | --help)
        usage
        exit 0
        ;;
      --)
        shift
        USER_CMD=("$@")
        return
        ;;
      -*) die "unknown option: $arg (see $PROG --help)" ;;
      *)
        [[ -z $COMMAND ]] || die "unexpected argument: $arg (put the command to run after --)"
        COMMAND=$arg
        ;;
    esac
    shift
  done
}

# Sets GROUP (the gcloud command group) and SCOPE (zone and project flags) once settings are known.
init_target() {
  require "$TPU_NAME" "TPU name" --name TPU_NAME
  require "$ZONE" "zone" --zone ZONE
  require "$PROJECT" "project" --project PROJECT
  [[ $NUM_SLICES =~ ^[1-9][0-9]*$ ]] || die "--num-slices must be a positive integer, got '$NUM_SLICES'"
  if ((NUM_SLICES > 1)); then
    GROUP=(gcloud compute tpus queued-resources)
  else
    GROUP=(gcloud compute tpus tpu-vm)
  fi
  SCOPE=("--zone=$ZONE" "--project=$PROJECT")
}

# Sets TARGETS to the flags that select workers: one worker or all; on a multi-slice queued
# resource, 'all' also means every slice (node) and a single worker lies on slice 0.
select_workers() {
  local worker=$1
  [[ $worker == all || $worker =~ ^[0-9]+$ ]] || die "--worker must be a number or 'all', got '$worker'"
  if ((NUM_SLICES > 1)); then
    if [[ $worker == all ]]; then
      TARGETS=(--node=all --worker=all)
    else
      TARGETS=(--node=0 "--worker=$worker")
    fi
  else
    TARGETS=("--worker=$worker")
  fi
}

# The topology name `vidlankd plan` takes for an accelerator type (v5litepod-16 -> v5e:4x4):
# v5e and v6e count chips on a 2D torus, v4 and v5p TensorCores (two a chip) on a 3D one. From
# the smallest slice (1x1, 2x2x1), each doubling doubles the smallest side (the last of equals).
plan_topology() {
  local type=$1 kind count chips dims i smallest
  count=${type##*-}
  [[ $count =~ ^[1-9][0-9]*$ ]] || return 1
  case $type in
    v5litepod-* | v5e-*) kind=v5e chips=$count dims=(1 1) ;;
    v6e-*) kind=v6e chips=$count dims=(1 1) ;;
    v4-* | v5p-*) kind=${type%%-*} chips=$((count / 2)) dims=(2 2 1) ;;
    *) return 1 ;;
  esac
  while (($(IFS='*' && echo "$((${dims[*]}))") < chips)); do
    smallest=0
    for i in "${!dims[@]}"; do
      ((dims[i] > dims[smallest])) || smallest=$i
    done
    dims[smallest]=$((dims[smallest] * 2))
  done
  (($(IFS='*' && echo "$((${dims[*]}))") == chips)) || return 1
  local IFS=x
  echo "$kind:${dims[*]}"
}

# Plans the command's --config for the slice with 'vidlankd plan' and stops (with the plan's
# status and its last line) when the run will not fit or the topology cannot hold its mesh.
preflight() {
  [[ $PREFLIGHT == 1 ]] || return 0
  local configs=() i=0 arg
  while ((i < ${#USER_CMD[@]})); do
    arg=${USER_CMD[i]}
    case $arg in
      --config=* | --config.*=*) configs+=("$arg") ;;
      --config | --config.*)
        configs+=("$arg=${USER_CMD[i + 1]:-}")
        i=$((i + 1))
        ;;
    esac
    i=$((i + 1))
  done
  if ((${#configs[@]} == 0)); then
    [[ $COMMAND != create ]] || note "preflight: no run given after -- (create -- python -m vidlankd_jax.main --config=...): nothing to plan"
    return 0
  fi
  [[ -n $ACCELERATOR_TYPE ]] ||
    die "preflight: the accelerator type is not set: pass --accelerator-type or set ACCELERATOR_TYPE (or --no-preflight)"
  local topology
  topology=$(plan_topology "$ACCELERATOR_TYPE") ||
    die "preflight: no plan topology for accelerator type '$ACCELERATOR_TYPE' (pass --no-preflight to skip the plan)"
  local plan_cmd
  read -r -a plan_cmd <<<"${VIDLANKD_PLAN:-python -m vidlankd_jax.cli plan}"
  plan_cmd+=("${configs[@]}" "--topology=$topology" "--num_slices=$NUM_SLICES")
  if [[ $DRY_RUN == 1 ]]; then
    show "${plan_cmd[@]}"
    return 0
  fi
  note "preflight: planning the run for $ACCELERATOR_TYPE ($topology) x $NUM_SLICES slice(s)"
  show "${plan_cmd[@]}" >&2
  local output status=0
  output=$(cd "$SCRIPT_DIR" && "${plan_cmd[@]}" 2>&1) || status=$?
  if ((status != 0)); then
    local last
    last=$(printf '%s
' "$output" | sed '/^[[:space:]]*$/d' | tail -n 1)
    printf '%s: error: preflight refused the run on %s: %s (--no-preflight skips the check)
' \
      "$PROG" "$topology" "$last" >&2
    exit "$status"
  fi
  printf '%s
' "$output" >&2
}

# Runs a script on the selected workers (in the login shell there: bash on TPU VM images).
ssh_workers() {
  local worker=$1 script=$2
  select_workers "$worker"
  run_cmd "${GROUP[@]}" ssh "$TPU_NAME" "${TARGETS[@]}" "${SCOPE[@]}" "--command=$script"
}

# Whether the TPU exists (under --dry-run: prints the check and answers no).
describe_quietly() {
  [[ $DRY_RUN == 1 ]] && show "${GROUP[@]}" describe "$TPU_NAME" "${SCOPE[@]}" && return 1
  "${GROUP[@]}" describe "$TPU_NAME" "${SCOPE[@]}" >/dev/null 2>&1
}

cmd_create() {
  require "$ACCELERATOR_TYPE" "accelerator type" --accelerator-type ACCELERATOR_TYPE
  if [[ -z $RUNTIME_VERSION ]]; then
    RUNTIME_VERSION=$(default_runtime_version "$ACCELERATOR_TYPE") ||
      die "no default runtime version for '$ACCELERATOR_TYPE': pass --runtime-version or set RUNTIME_VERSION"
  fi
  preflight
  if describe_quietly; then
    note "reusing the existing TPU '$TPU_NAME' in $ZONE"
    return 0
  fi
  local create=("${GROUP[@]}" create "$TPU_NAME" "${SCOPE[@]}" "--accelerator-type=$ACCELERATOR_TYPE")
  if ((NUM_SLICES > 1)); then
    [[ $PREEMPTIBLE == 0 ]] || die "queued resources take --spot, not --preemptible"
    create+=("--runtime-version=$RUNTIME_VERSION" "--node-count=$NUM_SLICES" "--node-prefix=$TPU_NAME")
  else
    create+=("--version=$RUNTIME_VERSION")
    [[ $PREEMPTIBLE == 0 ]] || create+=(--preemptible)
  fi
  [[ $SPOT == 0 ]] || create+=(--spot)
  run_cmd "${create[@]}"
  if ((NUM_SLICES > 1)); then
    wait_until_active
  fi
}

# Polls a queued resource until its slices are provisioned.
wait_until_active() {
  local state_cmd=("${GROUP[@]}" describe "$TPU_NAME" "${SCOPE[@]}" '--format=value(state.state)')
  if [[ $DRY_RUN == 1 ]]; then
    show "${state_cmd[@]}"
    return
  fi
  local state
  while true; do
    state=$("${state_cmd[@]}") || die "could not read the state of queued resource '$TPU_NAME'"
    case $state in
      ACTIVE) note "queued resource '$TPU_NAME' is ACTIVE" && return ;;
      FAILED | SUSPENDED | SUSPENDING) die "queued resource '$TPU_NAME' is $state (see: $PROG status)" ;;
      *) note "queued resource '$TPU_NAME' is ${state:-unknown}; waiting ${POLL_SECONDS}s" ;;
    esac
    sleep "$POLL_SECONDS"
  done
}

cmd_setup() {
  [[ $PYTHON_VERSION =~ ^3\.[0-9]+$ ]] || die "--python-version must look like 3.11, got '$PYTHON_VERSION'"
  local code=$REMOTE_CODE fetch
  if [[ -n $REPO_URL ]]; then
    fetch="git clone --depth 1${REPO_REF:+ --branch $(printf '%q' "$REPO_REF")} $(printf '%q' "$REPO_URL") $code"
  else
    [[ -z $REPO_REF ]] || die "--ref needs --repo"
    copy_tree
    fetch="mkdir -p $code && tar -xzf ~/$REMOTE_TARBALL -C $code"
  fi
  local python="python$PYTHON_VERSION"
  # Ubuntu images ship an older Python: install the wanted one (with venv) when it is missing.
  ssh_workers all "set -euo pipefail; \
if ! $python -c 'import ensurepip' >/dev/null 2>&1; then \
sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $python $python-venv; fi; \
rm -rf $code && $fetch; \
$python -m venv ~/venv && ~/venv/bin/pip install -q -U pip; \
~/venv/bin/pip install -q -e $code 'jax[tpu]'; \
~/venv/bin/python -c 'import jax, vidlankd_jax; print(\"vidlankd_jax installed with jax\", jax.__version__)'"
}

# Copies the git working tree (tracked and untracked files, without ignored ones) to every worker.
copy_tree() {
  command -v git >/dev/null || die "setup copies the git working tree and needs git (or pass --repo URL)"
  TARBALL="${TMPDIR:-/tmp}/tpu_launch-$TPU_NAME-$$.tar.gz"
  local tarball=$TARBALL
  if [[ $DRY_RUN == 1 ]]; then
    printf '%s | %s\n' "$(show git -C "$SCRIPT_DIR" ls-files -z --cached --others --exclude-standard)" \
      "$(show tar -C "$SCRIPT_DIR" --null --ignore-failed-read -T - -czf "$tarball" | cut -c3-)"
  else
    trap 'rm -f "$TARBALL"' EXIT
    git -C "$SCRIPT_DIR" ls-files -z --cached --others --exclude-standard |
      tar -C "$SCRIPT_DIR" --null --ignore-failed-read -T - -czf "$tarball"
  fi
  select_workers all
  run_cmd "${GROUP[@]}" scp "$tarball" "$TPU_NAME:$REMOTE_TARBALL" "${TARGETS[@]}" "${SCOPE[@]}"
}

cmd_run() {
  ((${#USER_CMD[@]})) || die "no command to run: give it after --, e.g. $PROG run -- python -m vidlankd_jax.main ..."
  local quoted_cmd env_setup='' arg
  printf -v quoted_cmd '%q ' "${USER_CMD[@]}"
  if [[ -n $WORKDIR_URL ]]; then
    [[ $WORKDIR_URL == gs://* ]] || die "--workdir must be a gs:// URL that every worker shares, got '$WORKDIR_URL'"
    for arg in "${USER_CMD[@]}"; do
      [[ $arg != --workdir && $arg != --workdir=* ]] || die "give the workdir once, with $PROG --workdir, not in the command"
    done
    quoted_cmd+=$(printf '%q' "--workdir=$WORKDIR_URL")
    env_setup="export WORKDIR=$(printf '%q' "$WORKDIR_URL") && "
  fi
  preflight
  local run_id
  run_id="$TPU_NAME-$(date +%Y%m%d-%H%M%S)"
  local job="cd $REMOTE_CODE && . ~/venv/bin/activate && ${env_setup}${quoted_cmd% }"
  local logs="mkdir -p $REMOTE_LOG_DIR && ln -sfn $run_id.log $REMOTE_LOG_DIR/latest.log"
  if [[ $DETACH == 1 ]]; then
    ssh_workers "${WORKER:-all}" "$logs && { nohup setsid bash -c $(squote "$job") >$REMOTE_LOG_DIR/$run_id.log 2>&1 </dev/null & echo \$! >$REMOTE_LOG_DIR/latest.pid; } && echo \"started $run_id on \$(hostname)\""
    return
  fi
  local script="set -o pipefail; $logs && ( $job ) 2>&1 | tee $REMOTE_LOG_DIR/$run_id.log"
  if [[ $DRY_RUN == 1 ]]; then
    ssh_workers "${WORKER:-all}" "$script"
    return
  fi
  mkdir -p "$LOG_DIR"
  local log_file="$LOG_DIR/$run_id.log"
  note "logging to $log_file"
  ssh_workers "${WORKER:-all}" "$script" 2>&1 | tee -a "$log_file"
}

cmd_logs() {
  local follow=''
  [[ $FOLLOW == 0 ]] || follow=' -F'
  ssh_workers "${WORKER:-0}" "tail -n 200$follow $REMOTE_LOG_DIR/latest.log"
}

cmd_kill() {
  ssh_workers all "if pid=\$(cat $REMOTE_LOG_DIR/latest.pid 2>/dev/null) && kill -TERM -- -\$pid 2>/dev/null; \
then echo \"ended run \$pid on \$(hostname)\"; else echo \"no detached run left on \$(hostname)\"; fi"
}

cmd_status() {
  run_cmd "${GROUP[@]}" describe "$TPU_NAME" "${SCOPE[@]}"
}

cmd_start_stop() {
  ((NUM_SLICES == 1)) || die "the slices of a queued resource cannot be started or stopped; use delete (and create)"
  run_cmd "${GROUP[@]}" "$1" "$TPU_NAME" "${SCOPE[@]}"
}

cmd_delete() {
  local delete=("${GROUP[@]}" delete "$TPU_NAME" "${SCOPE[@]}")
  ((NUM_SLICES == 1)) || delete+=(--force)
  [[ $ASSUME_YES == 0 ]] || delete+=(--quiet)
  run_cmd "${delete[@]}"
}

main() {
  TPU_NAME=${TPU_NAME:-} ZONE=${ZONE:-} PROJECT=${PROJECT:-}
  ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-} RUNTIME_VERSION=${RUNTIME_VERSION:-}
  NUM_SLICES=${NUM_SLICES:-1} POLL_SECONDS=${POLL_SECONDS:-30}
  SPOT=0 PREEMPTIBLE=0 DETACH=0 FOLLOW=0 ASSUME_YES=0 DRY_RUN=0 PREFLIGHT=1
  REPO_URL='' REPO_REF='' PYTHON_VERSION=3.11 WORKDIR_URL='' WORKER='' COMMAND=''
  LOG_DIR="$SCRIPT_DIR/runs/tpu_logs"
  USER_CMD=()
  parse_args "$@"
  [[ -n $COMMAND ]] || {
    usage >&2
    exit 2
  }
  [[ $COMMAND == run || $COMMAND == create || ${#USER_CMD[@]} == 0 ]] ||
    die "only 'run' (and 'create', for its preflight) take a command after --"
  [[ $SPOT == 0 || $PREEMPTIBLE == 0 ]] || die "choose one of --spot and --preemptible"
  case $COMMAND in
    create | setup | run | logs | kill | status | start | stop | delete) init_target ;;
    *) die "unknown command: $COMMAND (see $PROG --help)" ;;
  esac
  case $COMMAND in
    create) cmd_create ;;
    setup) cmd_setup ;;
    run) cmd_run ;;
    logs) cmd_logs ;;
    kill) cmd_kill ;;
    status) cmd_status ;;
    start | stop) cmd_start_stop "$COMMAND" ;;
    delete) cmd_delete ;;
  esac
}

main "$@"
