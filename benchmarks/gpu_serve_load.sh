#!/usr/bin/env bash
# One device call: benchmarks/serve_load.py with the given arguments (the carried wheels installed first);
# everything lands under $OUT.   bash benchmarks/gpu_serve_load.sh --compile --quantize fp8
source "$(dirname "$0")/gpu_env.sh"
python3 -m benchmarks.serve_load "$@" > $OUT/serve_load.log 2>&1
rc=$?
grep -E '^\{"card"|Error|Traceback' $OUT/serve_load.log | tail -20
exit $rc
