#!/usr/bin/env bash
# The composed-reward CPU experiment of issue 20, from the embedded base model to the held-out
# readout of two seeds, in one command (bench/results/compose_smol/README.md has the results):
#
#   QALIGN_DATA=../shared/data bash bench/compose_smol_chain.sh workdirs/chain
#
# Stages (wall times on the 2-core AMD EPYC, each alone, 2026-12-07; ~82 min for one seed):
#   1. bon     best-of-16 on the `:contrast` prompts by the refusal + degeneracy components (~27 min)
#   2. sft     SFT on the kept answers (~9 min)
#   3. asym    GRPO `:contrast,advbench,focus,explicit,asym`, T 1, lr 5e-5, 20 steps (~20 min):
#              turns the SFT's "I'm sorry for any misunderstanding, but as an AI ..." deflections
#              into stated refusals, which the last stage's reward counts
#   4. noback  GRPO `:contrast,advbench,focus,stated,strict,noback`, T 0.5, KL 0.1 to the asym
#              policy, lr 5e-5, 20 steps (~23 min per seed; seeds side by side share the cores)
#   5. eval    configs/eval_smol.py:safety on each seed's policy and on STAGE_EVALS' (~3 min
#              each; the base model's readout is bench/results/compose_smol/eval_base_stated.md)
# A stage that finished is skipped on a rerun with the same command (marker $W/.done_NAME holds
# it; a rerun with another command, e.g. another BON, stops and says so); a stopped training
# stage resumes from its last checkpoint. Each stage logs to $W/NAME.log with its wall time and peak RSS.
# DRY_RUN=1 prints each stage's command and runs nothing.
# SEEDS="0 1" (default) picks the last stage's seeds; each seed runs in the background beside
# the others, so on 2 cores one seed alone takes about half as long.
# BON=contrast (default) picks the best-of-n config's arguments (`contrast,budget`: 2 samples
# for a benign prompt, not 16, ~14 min; measured once, GRPO from it learned to refuse nothing);
# STAGE_EVALS="asym sft" (default) the intermediate policies that
# are evaluated too ("" for none).
set -euo pipefail

W=${1:?usage: bash bench/compose_smol_chain.sh WORKDIR}
SEEDS=${SEEDS:-"0 1"}
BON=${BON:-contrast}
STAGE_EVALS=${STAGE_EVALS-"asym sft"}
PY=${PY:-python}
export MALLOC_ARENA_MAX=2 # freed memory back to the OS between XLA threads' arenas
TIMER=() # wall time and peak RSS into each log where GNU time is installed
[[ -x /usr/bin/time ]] && TIMER=(/usr/bin/time -v)
mkdir -p "$W"

stage() { # stage NAME COMMAND...: run COMMAND once (a marker file records its success), logged
  local name=$1 done="$W/.done_$1"
  shift
  if [[ -e $done ]]; then
    if [[ ! -s $done || $(<"$done") == "$*" ]]; then # (an empty marker: the command unrecorded)
      echo "[chain] $name: done before, skipped"
      return
    fi
    printf '[chain] %s was done with another command:\n  %s\nnot this one:\n  %s\n%s\n' \
      "$name" "$(<"$done")" "$*" "Use another workdir, or remove $done and $W/$name to rerun it." >&2
    return 1
  fi
  if [[ -n ${DRY_RUN:-} ]]; then # print the command, run nothing
    echo "[dry-run] $name: $*"
    return
  fi
  echo "[chain] $name: started $(date -u +%H:%M:%S)"
  local t0=$SECONDS rc=0
  "${TIMER[@]}" "$@" >"$W/$name.log" 2>&1 || rc=$?
  if ((rc != 0)); then
    echo "[chain] $name FAILED (rc $rc); the end of $W/$name.log:" >&2
    tail -20 "$W/$name.log" >&2
    return "$rc"
  fi
  printf '%s\n' "$*" >"$done"
  echo "[chain] $name: done in $(((SECONDS - t0) / 60)) min," \
    "$(grep -o 'Maximum resident set size (kbytes): [0-9]*' "$W/$name.log" | awk '{print int($NF / 1e6 * 10) / 10}') GB peak RSS"
}

TRAIN=("$PY" -m qalign_jax.train)
evaluate() { # evaluate NAME MODEL: the held-out readout into $W/eval_NAME
  stage "eval_$1" "$PY" -m qalign_jax.eval --config configs/eval_smol.py:safety --model "$2" \
    --name "$1" --output "$W/eval_$1"
}
background() { # background COMMAND...: run it beside the others; `wait_all` fails if one did
  "$@" &
  pids+=($!)
}
wait_all() {
  local p rc=0
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  pids=()
  return "$rc"
}

stage bon "${TRAIN[@]}" --config "configs/best_of_n_compose_smol.py:$BON" --workdir "$W/bon"
stage sft "${TRAIN[@]}" --config configs/sft_prime_smol.py:best_of_n --workdir "$W/sft" \
  --config.data.train_path="$W/bon/sft.jsonl"
stage asym "${TRAIN[@]}" --config configs/qalign_grpo_compose_smol.py:contrast,advbench,focus,explicit,asym \
  --workdir "$W/asym" --config.checkpoint.init="$W/sft" \
  --config.optimizer.lr=5e-5 --config.model.remat=full

pids=()
for s in $SEEDS; do
  background stage "noback_s$s" "${TRAIN[@]}" \
    --config configs/qalign_grpo_compose_smol.py:contrast,advbench,focus,stated,strict,noback \
    --workdir "$W/noback_s$s" --config.checkpoint.init="$W/asym" --config.seed="$s" \
    --config.optimizer.lr=5e-5 --config.model.remat=full \
    --config.grpo.temperature=0.5 --config.grpo.kl_beta=0.1 \
    --config.grpo.rollouts_every=1 --config.grpo.rollouts_shown=-1
done
wait_all
for s in $SEEDS; do background evaluate "noback_s$s" "$W/noback_s$s"; done
wait_all
for name in $STAGE_EVALS; do background evaluate "$name" "$W/$name"; done
wait_all
echo "[chain] done $(date -u +%H:%M:%S)"
