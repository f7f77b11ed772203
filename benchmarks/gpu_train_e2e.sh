#!/usr/bin/env bash
# One device call (../shared/gpu/README.md): install the carried wheels (once per machine), benchmarks/train_e2e.py
# with the given arguments, then the GPU-only tests. Everything lands under $OUT.
#   bash benchmarks/gpu_train_e2e.sh --rows plain,fast,fast_fp8   (the eager baseline runs first, same call)
# The tests run last, so a call that runs out of time loses tests, not rows (each row's JSON is written as it ends);
# on an H100 two of the bucket-shape test's three cases alone took ~200 s (three shapes compiled with inductor per
# case): SKIP_GPU_TESTS=1 leaves the tests out.
source "$(dirname "$0")/gpu_env.sh"
python3 -m benchmarks.train_e2e "$@" > $OUT/train_e2e.log 2>&1
rc=$?
grep -E '^\{"row"|^wrote|Error|error|Traceback|^step ' $OUT/train_e2e.log | grep -v "^\[" | tail -40
grep -E '"row"|step [0-9]+/' $OUT/train_e2e.log | tail -30
if [ -z "${SKIP_GPU_TESTS:-}" ]; then
  python3 -m pytest -q -p no:cacheprovider tests/model/test_attention.py tests/model/test_transformer.py -k "gpu or cudnn" 2>&1 | tail -4 | tee $OUT/gpu_tests.log
fi
exit $rc
