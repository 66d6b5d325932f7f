#!/usr/bin/env bash
# Run every methods/<slug>.py (or the slugs named), for each seed; a failing method is reported and the
# others still run. Ends by writing runs/SUMMARY.md (python shared.py summarize runs/) and printing it.
#
#   ./run_all.sh                                   every paper, default (CPU) preset, seed 0
#   ./run_all.sh --preset smoke                    every paper, seconds each
#   ./run_all.sh --seeds "0 1 2" icl_learning_algorithm pointer_networks
#   ./run_all.sh --bench --device cuda             the speed table (reference vs fused, eager vs compile)
#   ./run_all.sh --out-dir /tmp/r ...              write runs and SUMMARY.md there instead of runs/
# Any other flag (e.g. --device cuda, --attn reference) is passed through to every script.
set -euo pipefail
cd "$(dirname "$0")"

preset="" ; seeds="0" ; out="runs" ; slugs=() ; extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --preset) preset="$2"; shift 2 ;;
    --preset=*) preset="${1#*=}"; shift ;;
    --seeds) seeds="$2"; shift 2 ;;
    --seeds=*) seeds="${1#*=}"; shift ;;
    --out-dir) out="$2"; shift 2 ;;
    --out-dir=*) out="${1#*=}"; shift ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) if [[ -f "methods/$1.py" ]]; then slugs+=("$1"); else extra+=("$1"); fi; shift ;;
  esac
done
if [[ ${#slugs[@]} -eq 0 ]]; then
  for f in methods/*.py; do slugs+=("$(basename "$f" .py)"); done
fi

mkdir -p "$out"
failed=()
for slug in "${slugs[@]}"; do
  for seed in $seeds; do
    log="${out}/${slug}__${preset:-default}__s${seed}.log"
    echo "=== ${slug} (preset ${preset:-default}, seed ${seed}) -> ${log}"
    if ! python "methods/${slug}.py" ${preset:+--preset "$preset"} --seed "$seed" --out-dir "$out" ${extra[@]+"${extra[@]}"} 2>&1 | tee "$log"; then
      failed+=("${slug}/s${seed}")
    fi
  done
done

python shared.py summarize "$out" > "$out/SUMMARY.md"
echo; cat "$out/SUMMARY.md"
if [[ ${#failed[@]} -gt 0 ]]; then
  echo; echo "FAILED: ${failed[*]}"; exit 1
fi
