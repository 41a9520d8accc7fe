#!/usr/bin/env bash
# Submit a sharded explain-cli run as a Slurm array, then a merge job that runs when every
# array task has finished successfully.
#
#   configs/slurm/submit.sh CONFIG OUTPUT_DIR [N] [extra sbatch options...]
#
#   CONFIG       the run's YAML config
#   OUTPUT_DIR   the shared output folder (passed as --output, so all shards and the merge agree)
#   N            number of shards / array tasks (default 4)
#   the rest     passed to the array's sbatch (e.g. --partition=gpu --time=08:00:00)
#
# Environment: EXPLAIN_CLI (the command, default explain-cli), EXPLAIN_RUN_ARGS (extra
# `explain-cli run` options, e.g. "--set explainer.nsamples=500"), MERGE_SBATCH_ARGS (extra
# options for the merge job, e.g. "--partition=cpu"), SBATCH_SCRIPT (default: the template
# next to this file). sbatch passes this shell's environment (PATH, a venv) on to the jobs.
#
# The merge job depends on afterok: if a task fails or is cancelled, the merge job is
# cancelled too (--kill-on-invalid-dep=yes). Resubmit to finish: done images are skipped,
# and the merge refuses (exit 2, naming the shard) until every shard is complete.
set -euo pipefail

if [ $# -lt 2 ]; then
    sed -n '2,20p' "$0" >&2
    exit 2
fi
config="$1"; out="$2"; shift 2
n=4
if [ $# -gt 0 ] && [[ "$1" =~ ^[0-9]+$ ]]; then n="$1"; shift; fi
[ "$n" -ge 1 ] || { echo "submit.sh: N must be >= 1" >&2; exit 2; }
[ -f "$config" ] || { echo "submit.sh: config not found: $config" >&2; exit 2; }
here="$(cd "$(dirname "$0")" && pwd)"
script="${SBATCH_SCRIPT:-$here/explain-array.sbatch}"
config="$(cd "$(dirname "$config")" && pwd)/$(basename "$config")"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
read -r -a run_args <<< "${EXPLAIN_RUN_ARGS:-}"
read -r -a merge_args <<< "${MERGE_SBATCH_ARGS:-}"
cli="${EXPLAIN_CLI:-explain-cli}"

jobid="$(sbatch --parsable --array="0-$((n - 1))" --output="$out/slurm-%A_%a.out" "$@" \
         "$script" "$config" --output "$out" "${run_args[@]}")"
jobid="${jobid%%;*}"  # --parsable prints "jobid[;cluster]"
echo "submitted array job $jobid: $n shard(s) of $config -> $out"

# printf %q keeps paths with spaces intact inside --wrap.
merge_cmd="$cli merge $(printf '%q' "$out")"
merge_id="$(sbatch --parsable --job-name=explain-merge --dependency="afterok:$jobid" \
            --kill-on-invalid-dep=yes --ntasks=1 --cpus-per-task=1 --mem=2G --time=00:30:00 \
            --output="$out/slurm-merge-%j.out" "${merge_args[@]}" --wrap "$merge_cmd")"
merge_id="${merge_id%%;*}"
echo "submitted merge job $merge_id (after $jobid succeeds): $merge_cmd"
echo "watch: squeue -j $jobid,$merge_id   logs: $out/slurm-*.out"
