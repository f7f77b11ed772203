#!/usr/bin/env bash
# One device call: the GPU case of serving's fp8 linear test, then benchmarks/serve_latency.py with the given
# arguments (the carried wheels installed first); everything lands under $OUT.
#   bash benchmarks/gpu_serve_latency.sh --variants eager,fp8_compiled,fp8ao_compiled
source "$(dirname "$0")/gpu_env.sh"
python3 -m pytest -q -p no:cacheprovider tests/model/test_transformer.py -k rowwise 2>&1 | tail -3 | tee $OUT/gpu_tests.log
python3 -m benchmarks.serve_latency --out $OUT/serve_latency.json "$@" > $OUT/serve_latency.log 2>&1
rc=$?
grep -E '^[a-z0-9_]+ \{|Error|Traceback' $OUT/serve_latency.log | tail -20
exit $rc
