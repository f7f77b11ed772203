#!/usr/bin/env bash
# The mission end to end on the tiny model, on a local Ray. Each stage prints where its output is.
set -euo pipefail
PY=${PY:-.venv/bin/python}
DEMO=${DEMO:-/tmp/longcat-ray-demo}
CLI="$PY -m longcat_ray.cli"
rm -rf "$DEMO"

echo "== 1. tiny model + synthetic paired data + SimpleTuner config"
$CLI make-tiny "$DEMO" --pairs 12

echo "== 2. config check"
$CLI config check --config "$DEMO/config/config.json" > "$DEMO/resolved-config.json"
echo "resolved config: $DEMO/resolved-config.json"

echo "== 3. latent cache (Ray Data on encoder actors); the second run reuses every entry"
$CLI cache --config "$DEMO/config/config.json"
$CLI cache --config "$DEMO/config/config.json"

echo "== 4. LoRA training: Ray Train, 2 CPU workers, DeepSpeed ZeRO-1 on gloo (re-running resumes)"
$CLI train --config "$DEMO/config/config.json"

echo "== 5. one edit with the tiny pipeline (the one inference path)"
$CLI edit --pretrained_model_name_or_path "$DEMO/model" --image "$DEMO/data/refs/pair_0001.png" \
  --prompt "swap the red and blue colours" --resolution 128x128 --steps 4 --output "$DEMO/edit.png"

echo "== 6. serve the trained LoRA (Ray Serve) and edit one image over HTTP with it"
PORT=${PORT:-8000}
$CLI serve --model "$DEMO/model" --lora-root "$DEMO" --port "$PORT" > "$DEMO/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
$PY scripts/http_edit.py --url "http://127.0.0.1:$PORT" --wait 240 --image "$DEMO/data/refs/pair_0001.png" \
  --prompt "swap the red and blue colours" --lora output --steps 4 --size 128x128 --output "$DEMO/served-edit.png"
echo "server log: $DEMO/serve.log (page: http://127.0.0.1:$PORT/ while it runs)"

echo "demo finished: everything is under $DEMO"
