#!/usr/bin/env bash
# One lent GPU's prepared run, from a fresh checkout, in two commands (docs/gpu.md records each run):
#
#   bash benchmarks/gpu_lease.sh --fetch     here, once: the wheels the GPU machine's image lacks, into .whl/
#                                            (pure-Python plotly and narwhals; .whl/ is ignored by git)
#   bash benchmarks/gpu_lease.sh             there: the device tool's `run`, with carry [".whl"] and timeout_s
#                                            about 560; installs .whl/ into /tmp/site, then runs gpu.sh's lease steps
#                                            into $OUT (set by the device tool), whose 8 files come back
#
# LEASE_STEPS overrides the steps (gpu.sh's names). The default ones write 8 files, the most the device tool brings
# back from one call: log.txt, steps.txt and six tables.
set -u
cd "$(dirname "$0")/.."
WHEELS="plotly==7.1.0 narwhals==2.29.0"

if [ "${1:-}" = "--fetch" ]; then
    mkdir -p .whl
    python3 -m pip download --no-deps --only-binary=:all: -q -d .whl $WHEELS
    ls -l .whl
    exit 0
fi

OUT=${OUT:?OUT is not set: run this through the device tool, or set OUT to a folder}
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
exec bash benchmarks/gpu.sh "$OUT" ${LEASE_STEPS:-tests kernels fp32 fp32-formed bf16 batch eval-rate profile class-maps graph-routes}
