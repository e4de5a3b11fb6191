#!/usr/bin/env bash
# Multi-host GPU runs of qalign_jax under SLURM: one process per host, jax.distributed over all.
#
#   launch/gpu_slurm.sh --nodes 2 --gpus-per-node 8 --config configs/qalign_grpo_llama3_8b.py \
#     --workdir /shared/workdirs/grpo_8b [--partition gpu] [--time 12:00:00] [-- --config.x=y]
#
# Writes an sbatch script to <workdir>/slurm/<job name>.sbatch and submits it. Each host runs
# one `python -m qalign_jax.train` that drives all of that host's GPUs; the first host is the
# coordinator (JAX_COORDINATOR_ADDRESS=<first host>:<port>, JAX_NUM_PROCESSES = nodes,
# JAX_PROCESS_ID = the SLURM task id; qalign_jax.sharding.initialize_distributed reads them).
# Per-host logs: <workdir>/slurm/<job id>.<task id>.log. Follow with `tail -F` on those files.
# The checkout (with .venv, from `make setup`) must be on a filesystem every host sees, and so
# must the workdir; the venv needs the CUDA build of jax: .venv/bin/pip install "jax[cuda12]"
# (same version as requirements.txt). --dry-run prints the sbatch script instead of submitting.
set -euo pipefail

usage() {
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
  cat <<'TXT'
Options:
  --nodes N            hosts (required)
  --gpus-per-node G    GPUs per host (required)
  --config FILE        the experiment config (required)
  --workdir DIR        the workdir, on a filesystem every host sees (required)
  --partition P        SLURM partition (default: the cluster's default)
  --time T             time limit, e.g. 12:00:00 (default: the partition's)
  --job-name NAME      default: qalign
  --port PORT          coordinator port on the first host (default 12355)
  --python PATH        python on the hosts (default: <repo>/.venv/bin/python)
  --dry-run            print the sbatch script instead of submitting it
  -h, --help           this help
Arguments after `--` are passed on to qalign_jax.train (config overrides).
TXT
}

die() {
  echo "launch/gpu_slurm.sh: $*" >&2
  exit 2
}

nodes="" gpus="" config="" workdir="" partition="" time_limit="" job="qalign" port=12355 dry=0
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="$repo/.venv/bin/python"
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) nodes=${2:?--nodes needs a value}; shift 2 ;;
    --gpus-per-node) gpus=${2:?--gpus-per-node needs a value}; shift 2 ;;
    --config) config=${2:?--config needs a value}; shift 2 ;;
    --workdir) workdir=${2:?--workdir needs a value}; shift 2 ;;
    --partition) partition=${2:?--partition needs a value}; shift 2 ;;
    --time) time_limit=${2:?--time needs a value}; shift 2 ;;
    --job-name) job=${2:?--job-name needs a value}; shift 2 ;;
    --port) port=${2:?--port needs a value}; shift 2 ;;
    --python) python=${2:?--python needs a value}; shift 2 ;;
    --dry-run) dry=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done

[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || die "--nodes is required: the number of hosts (e.g. 2)"
[[ "$gpus" =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node is required: GPUs per host (e.g. 8)"
[[ -n "$config" ]] || die "--config is required (e.g. configs/qalign_grpo_llama3_8b.py)"
[[ -n "$workdir" ]] || die "--workdir is required (a directory every host sees)"
[[ "$workdir" != gs://* ]] || die "--workdir: SLURM logs need a shared filesystem path, not gs://"
if [[ $dry -eq 0 ]] && ! command -v sbatch >/dev/null 2>&1; then
  die "sbatch is not on PATH: run this on a SLURM login node, or use --dry-run"
fi

args=$(printf '%q ' --config "$config" --workdir "$workdir" "${extra[@]}")
script=$(cat <<SBATCH
#!/usr/bin/env bash
#SBATCH --job-name=$job
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$gpus
#SBATCH --output=$workdir/slurm/%j.sbatch.log
${partition:+#SBATCH --partition=$partition}
${time_limit:+#SBATCH --time=$time_limit}
set -euo pipefail
head=\$(scontrol show hostnames "\$SLURM_JOB_NODELIST" | head -n 1)
export JAX_COORDINATOR_ADDRESS="\$head:$port" JAX_NUM_PROCESSES=\$SLURM_NNODES
cd $(printf '%q' "$repo")
srun --output=$workdir/slurm/%j.%t.log bash -c \\
  'JAX_PROCESS_ID=\$SLURM_PROCID exec $(printf '%q' "$python") -m qalign_jax.train $args'
SBATCH
)

if [[ $dry -eq 1 ]]; then
  echo "$script"
  exit 0
fi
mkdir -p "$workdir/slurm"
path="$workdir/slurm/$job.sbatch"
echo "$script" > "$path"
sbatch "$path"
echo "per-host logs: $workdir/slurm/<job id>.<task id>.log"
