#!/usr/bin/env bash
# The mission end to end on the tiny model, on a local Ray. Each stage prints where its output is.
set -euo pipefail
PY=${PY:-.venv/bin/python}
DEMO=${DEMO:-/tmp/longcat-ray-demo}
CLI="$PY -m longcat_ray.cli"
rm -rf "$DEMO"
mkdir -p "$DEMO"
STARTED=$(date +%s)

echo "== 0. one local Ray for every stage (each command joins it through RAY_ADDRESS; token auth, as a cluster has)"
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$DEMO/ray-token"
$PY -c "import secrets; print(secrets.token_hex(32), end='')" > "$RAY_AUTH_TOKEN_PATH"
free_port() { $PY -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
GCS_PORT=$(free_port)
# with its dashboard: Ray Train's placement-group cleaner asks the state API, which the dashboard serves (without it
# the cleaner logs "Failed to query Ray Train Controller actor state" every few seconds)
"$(dirname "$PY")/ray" start --head --port "$GCS_PORT" --node-ip-address 127.0.0.1 --num-cpus 4 \
  --dashboard-host 127.0.0.1 --dashboard-port "$(free_port)" --dashboard-agent-listen-port "$(free_port)" --temp-dir "$DEMO/ray" --disable-usage-stats > "$DEMO/ray-start.log" 2>&1
export RAY_ADDRESS="127.0.0.1:$GCS_PORT"
# At the end: stage 6's server and only this demo's Ray (`ray stop` would stop any other Ray on the machine too);
# the whole cluster goes, so the server needs no graceful Serve shutdown (that alone took ~40 s here)
stop_all() {
  [ -n "${SERVER:-}" ] && kill -9 "$SERVER" 2>/dev/null
  pkill -f -- "$DEMO/ray/" || true
  sleep 3; pkill -9 -f -- "$DEMO/ray/" || true  # the GCS server outlived SIGTERM once here
}
trap stop_all EXIT

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
disown "$SERVER"  # its kill at the end is expected: no "Killed" line
$PY scripts/http_edit.py --url "http://127.0.0.1:$PORT" --wait 240 --image "$DEMO/data/refs/pair_0001.png" \
  --prompt "swap the red and blue colours" --lora output --steps 4 --size 128x128 --output "$DEMO/served-edit.png"
echo "server log: $DEMO/serve.log (page: http://127.0.0.1:$PORT/ while it runs)"

GRID=$(ls "$DEMO"/output/validation/step_*.png 2>/dev/null | tail -1)
cat <<SUMMARY

== what the demo built (in $(( $(date +%s) - STARTED )) s), all under $DEMO
  model        $DEMO/model                  tiny random-init LongCat-Image-Edit pipeline (the real one's layout)
  data+config  $DEMO/data, $DEMO/config     12 edit/reference pairs; SimpleTuner config.json + multidatabackend.json
  cache        $DEMO/cache                  VAE latents + VL prompt embeddings, checksummed; manifest beside them
  LoRA         $DEMO/output/pytorch_lora_weights.safetensors  (diffusers keys; PEFT folder in $DEMO/output/adapter)
  validation   ${GRID:-$DEMO/output/validation (none: validation_steps was 0)}
  logs         $DEMO/output/logs            losses, samples per rank, TensorBoard
  edits        $DEMO/edit.png (CLI), $DEMO/served-edit.png (over HTTP with the LoRA)

== the same with real weights on a GPU cluster (README: "Running on a Ray cluster")
  in config/config.json set "--pretrained_model_name_or_path": "meituan-longcat/LongCat-Image-Edit" (or a local
  copy) and point multidatabackend.json at your pairs (local or s3://); then, from the repository root:
    ray job submit --address http://<head>:8265 --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/cache.py --config config/config.json
    ray job submit --address http://<head>:8265 --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/train.py --config config/config.json
    serve deploy serve/config.yaml    # after setting its lora_root to where your output_dirs are (args: every ServeConfig key)
SUMMARY
