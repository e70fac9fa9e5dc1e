#!/usr/bin/env bash
# One `python -m vizapp.evaluate` job split over many local processes on a machine with many cores: the job's shards
# go out in ranges of SPAN to NPROC processes at a time (`--shards lo:hi`, one torch thread each), then one
# `--report-only` run writes the report from every shard on disk. Shards already on disk are skipped, so running the
# same command again resumes a cut-off run; the numbers do not depend on how the job was split (docs/scaling.md).
#
#   bash benchmarks/eval_parallel.sh NPROC SHARDS SPAN EVALUATE-ARGS...
#
# SHARDS is the job's shard count (ceil(images / shard size); Fashion-MNIST's 10,000 test images in shards of 64:
# 157). EVALUATE-ARGS must include --out; --markdown goes to the final report only.
set -u
NPROC=${1:?usage: eval_parallel.sh NPROC SHARDS SPAN EVALUATE-ARGS...}
SHARDS=${2:?}
SPAN=${3:?}
shift 3
PY=${PYTHON:-python3}
run_args=()
report_args=()
while [ $# -gt 0 ]; do
    case $1 in
        --markdown) report_args+=("$1" "$2"); shift 2 ;;
        *) run_args+=("$1"); report_args+=("$1"); shift ;;
    esac
done
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
seq 0 "$SPAN" $((SHARDS - 1)) | xargs -P "$NPROC" -I{} sh -c \
    'lo=$1; shift; '"$PY"' -m vizapp.evaluate "$@" --threads 1 --shards "$lo:$((lo + '"$SPAN"'))" 2>&1 | tail -n 1' \
    sh {} "${run_args[@]}"
$PY -m vizapp.evaluate "${report_args[@]}" --report-only 2>&1 | tail -n 2
