#!/usr/bin/env bash
# Cloud TPU VM workflow for qalign_jax: create -> setup -> run -> logs -> delete.
#
#   launch/tpu.sh create --name qalign --zone us-east5-a --type v5p-64 [--spot | --queued]
#   launch/tpu.sh setup  --name qalign --zone us-east5-a
#   launch/tpu.sh run    --name qalign --zone us-east5-a --config configs/sft_prime_llama3_8b.py \
#                        --workdir gs://BUCKET/workdirs/sft_8b [-- --config.sft.num_steps=4]
#   launch/tpu.sh logs   --name qalign --zone us-east5-a [--worker 0|all] [--run NAME]
#   launch/tpu.sh delete --name qalign --zone us-east5-a [--queued]
#
# Every subcommand is a thin wrapper over gcloud; --dry-run prints the gcloud commands instead
# of running them. `run` starts the same `python -m qalign_jax.train` on every worker (all hosts
# take part in every program) in the background, each writing ~/qalign_logs/<run>.log on its
# own host; `logs` follows worker 0's log (or prints the tail of every worker's).
set -euo pipefail

usage() {
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
  cat <<'TXT'
Options:
  --name NAME        TPU VM name (required)
  --zone ZONE        GCP zone (required)
  --project ID       GCP project (default: gcloud's configured project)
  --type TYPE        accelerator type for create, e.g. v4-32, v5p-64, v6e-16 (required by create)
  --version VERSION  TPU runtime for create (default: tpu-ubuntu2204-base)
  --spot             create: a spot VM (cheaper, can be preempted)
  --queued           create/delete: go through a queued resource (waits for capacity)
  --config FILE      run: the experiment config (required by run)
  --workdir DIR      run: gs://BUCKET/path, or a directory every host sees (required)
  --run NAME         run/logs: the log name (default: the workdir's last component)
  --worker N|all     logs: which worker to follow (default 0)
  --repo DIR         setup: the checkout to copy (default: this repository)
  --dry-run          print the gcloud commands instead of running them
  -h, --help         this help
Arguments after `--` are passed on to qalign_jax.train (config overrides).
TXT
}

die() {
  echo "launch/tpu.sh: $*" >&2
  exit 2
}

[[ $# -ge 1 ]] || { usage >&2; die "missing subcommand: create | setup | run | logs | delete"; }
cmd=$1
shift
case "$cmd" in
  -h | --help) usage; exit 0 ;;
  create | setup | run | logs | delete) ;;
  *) die "unknown subcommand '$cmd'; use create | setup | run | logs | delete (see --help)" ;;
esac

name="" zone="" project="" type="" version="tpu-ubuntu2204-base" spot=0 queued=0
config="" workdir="" run_name="" worker="0" dry=0
repo="$(cd "$(dirname "$0")/.." && pwd)"
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name=${2:?--name needs a value}; shift 2 ;;
    --zone) zone=${2:?--zone needs a value}; shift 2 ;;
    --project) project=${2:?--project needs a value}; shift 2 ;;
    --type) type=${2:?--type needs a value}; shift 2 ;;
    --version) version=${2:?--version needs a value}; shift 2 ;;
    --spot) spot=1; shift ;;
    --queued) queued=1; shift ;;
    --config) config=${2:?--config needs a value}; shift 2 ;;
    --workdir) workdir=${2:?--workdir needs a value}; shift 2 ;;
    --run) run_name=${2:?--run needs a value}; shift 2 ;;
    --worker) worker=${2:?--worker needs a value}; shift 2 ;;
    --repo) repo=${2:?--repo needs a value}; shift 2 ;;
    --dry-run) dry=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done

[[ -n "$name" ]] || die "$cmd: --name is required (the TPU VM's name)"
[[ -n "$zone" ]] || die "$cmd: --zone is required (e.g. us-east5-a)"
case "$cmd" in
  create) [[ -n "$type" ]] || die "create: --type is required (e.g. v5p-64, v4-32, v6e-16)" ;;
  setup) [[ -f "$repo/requirements.txt" ]] || die "setup: $repo has no requirements.txt (--repo)" ;;
  run)
    [[ -n "$config" ]] || die "run: --config is required (e.g. configs/sft_prime_llama3_8b.py)"
    [[ -n "$workdir" ]] || die "run: --workdir is required (gs://BUCKET/path or a directory every host sees)"
    ;;
  logs)
    [[ -n "$run_name" ]] || die "logs: --run is required (the log name that run printed)"
    [[ "$worker" == "all" || "$worker" =~ ^[0-9]+$ ]] ||
      die "logs: --worker must be a number or 'all', not '$worker'"
    ;;
esac
if [[ $dry -eq 0 ]] && ! command -v gcloud >/dev/null 2>&1; then
  die "gcloud is not installed or not on PATH; install the Google Cloud CLI \
(https://cloud.google.com/sdk/docs/install) and run 'gcloud auth login', or use --dry-run"
fi

common=(--zone "$zone")
[[ -n "$project" ]] && common+=(--project "$project")

# Runs (or with --dry-run prints) one command.
do_run() {
  if [[ $dry -eq 1 ]]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

ssh_all() { do_run gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=all --command "$1"; }

case "$cmd" in
  create)
    if [[ $queued -eq 1 ]]; then
      flags=(--node-id "$name" --accelerator-type "$type" --runtime-version "$version")
      [[ $spot -eq 1 ]] && flags+=(--spot)
      do_run gcloud compute tpus queued-resources create "$name" "${common[@]}" "${flags[@]}"
      echo "queued; check: gcloud compute tpus queued-resources describe $name --zone $zone"
    else
      flags=(--accelerator-type "$type" --version "$version")
      [[ $spot -eq 1 ]] && flags+=(--spot)
      do_run gcloud compute tpus tpu-vm create "$name" "${common[@]}" "${flags[@]}"
    fi
    ;;
  setup)
    archive=$(mktemp -t qalign_jax.XXXXXX.tar.gz)
    if [[ $dry -eq 0 ]]; then
      tar -C "$repo" --exclude=.venv --exclude=.git --exclude=workdirs -czf "$archive" .
    fi
    do_run gcloud compute tpus tpu-vm scp "$archive" "$name:qalign_jax.tar.gz" "${common[@]}" \
      --worker=all
    ssh_all "mkdir -p ~/qalign_jax ~/qalign_logs && tar -xzf ~/qalign_jax.tar.gz -C ~/qalign_jax \
&& cd ~/qalign_jax && python3 -m venv .venv && .venv/bin/pip install -q -U pip \
&& .venv/bin/pip install -q -r requirements.txt 'jax[tpu]' \
&& .venv/bin/pip install -q --no-deps -e . \
&& .venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())'"
    rm -f "$archive"
    ;;
  run)
    run_name=${run_name:-$(basename "$workdir")}
    args=$(printf '%q ' --config "$config" --workdir "$workdir" "${extra[@]}")
    ssh_all "cd ~/qalign_jax && mkdir -p ~/qalign_logs && nohup .venv/bin/python -m \
qalign_jax.train $args > ~/qalign_logs/$run_name.log 2>&1 < /dev/null &"
    echo "started on every worker; follow with: launch/tpu.sh logs --name $name --zone $zone --run $run_name"
    ;;
  logs)
    if [[ "$worker" == "all" ]]; then
      ssh_all "echo == \$(hostname); tail -n 20 ~/qalign_logs/$run_name.log"
    else
      do_run gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker="$worker" \
        --command "tail -n 100 -F ~/qalign_logs/$run_name.log"
    fi
    ;;
  delete)
    if [[ $queued -eq 1 ]]; then
      do_run gcloud compute tpus queued-resources delete "$name" "${common[@]}" --force --quiet
    else
      do_run gcloud compute tpus tpu-vm delete "$name" "${common[@]}" --quiet
    fi
    ;;
esac
