#!/usr/bin/env bash
# One GPU check of ktray's web-scale data path, at most ~8 minutes on one H100:
#
#   bash benchmarks/gpu_check.sh            # from the repository root
#
# Prints one table (img/s, ratio to the bare baseline measured in the same run, goal):
#   - the logits pass (Ray Data: CPU decode stage + GPU actors, bf16) over JPEG Parquet
#     against a bare bf16 forward, ViT-B/16 and ViT-L/16 (timm, random weights, 224 px);
#     goal >= 0.9;
#   - distillation (FastViT-S12 student, precomputed float16 logits, bf16, Ray Train + Ray Data
#     input) against a bare PyTorch bf16 loop on ready tensors; goal >= 0.95;
#   - distillation with the ViT-B teacher online.
#
# Needs torch (CUDA), timm, pyarrow, PIL. The parts that need Ray install it from wheels
# carried in .whl/ (ray and its plain dependencies) when `import ray` fails; without them
# they are skipped with a line saying so. Environment: GPU_CHECK_OUT (work folder, default
# /tmp/ktray-gpu-check), GPU_CHECK_IMAGES (transfer images, default 60000; 6000 in a dry
# run), GPU_CHECK_SECONDS (each bare baseline's timed loop, default 8), GPU_CHECK_STEPS
# (distillation steps, default 480; 20 in a dry run: a bf16 student on 2 CPU cores),
# GPU_CHECK_RESULTS (the result rows, default $GPU_CHECK_OUT/results.jsonl). The Ray
# parts share one Ray head started here (token authentication on), so each pays no Ray
# start-up. GPU_CHECK_ONLY="data bare_train ..." runs only the parts named (first words);
# GPU_CHECK_ONLY=inputs (not in the default run, CPU only, ~2 minutes) measures which decode
# stage an inference pass should take on the node's cores (GPU_CHECK_INPUT_ROWS, 120000).
# GPU_CHECK_DRY=1 rehearses everything but the bare GPU parts on a CPU machine with
# tiny models. Make .whl/ with benchmarks/gpu_wheels.sh where pip reaches PyPI.
set -u
cd "$(dirname "$0")/.."
export GPU_CHECK_OUT="${GPU_CHECK_OUT:-/tmp/ktray-gpu-check}"
# a CPU rehearsal runs the passes and the 224-px student on 2 cores: fewer images and steps,
# or it outlasts the time limits
if [ -n "${GPU_CHECK_DRY:-}" ]; then IMAGES_DEFAULT=6000 STEPS_DEFAULT=20
else IMAGES_DEFAULT=60000 STEPS_DEFAULT=480; fi
export GPU_CHECK_IMAGES="${GPU_CHECK_IMAGES:-$IMAGES_DEFAULT}"
export GPU_CHECK_STEPS="${GPU_CHECK_STEPS:-$STEPS_DEFAULT}"
export GPU_CHECK_RESULTS="${GPU_CHECK_RESULTS:-$GPU_CHECK_OUT/results.jsonl}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
PY="${PYTHON:-python3}"
rm -f "$GPU_CHECK_RESULTS"
mkdir -p "$GPU_CHECK_OUT"
START=$(date +%s)

note() { echo "gpu_check: $*" >&2; }
part() {  # part SECONDS ARGS...: one part in its own process, bounded in time
    local limit=$1; shift
    if [ -n "${GPU_CHECK_ONLY:-}" ] && [[ " $GPU_CHECK_ONLY " != *" $1 "* ]]; then return; fi
    local t0=$(date +%s)
    if ! timeout "$limit" "$PY" benchmarks/gpu_check.py "$@"; then
        note "part '$*' failed or ran past ${limit}s (skipped in the table)"
    fi
    note "part '$*': $(( $(date +%s) - t0 ))s"
}

"$PY" - <<'EOF' || { echo "gpu_check: needs torch with CUDA, timm, pyarrow, PIL"; exit 1; }
import os, torch, timm, pyarrow, PIL  # noqa: F401,E401
dry = bool(os.environ.get("GPU_CHECK_DRY"))
assert dry or torch.cuda.is_available(), "no CUDA device"
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (dry run)"
print(f"gpu_check: {name}, torch {torch.__version__}, timm {timm.__version__}, "
      f"{torch.cuda.device_count()} GPU(s), {os.cpu_count()} CPUs")
EOF
export GPU_CHECK_GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count())')

HAVE_RAY=0
if "$PY" -c 'import ray, ray.data, ray.train' 2>/dev/null; then
    HAVE_RAY=1
elif ls .whl/ray-*.whl >/dev/null 2>&1; then
    # The wheels go to their own folder on PYTHONPATH (Ray's workers inherit it), without
    # touching the machine's packages: ray and what the machine lacks of its needs
    # (jsonschema, referencing, rpds-py, pydantic for Ray Train V2, ...).
    note "installing ray from the carried wheels in .whl/ into $GPU_CHECK_OUT/site"
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$GPU_CHECK_OUT/site" .whl/*.whl >&2 \
        && export PYTHONPATH="$PYTHONPATH:$GPU_CHECK_OUT/site" \
        && "$PY" -c 'import ray, ray.data, ray.train, ray.train.torch' && HAVE_RAY=1
fi
[ "$HAVE_RAY" = 1 ] && export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$GPU_CHECK_OUT/auth_token" \
    && { [ -s "$RAY_AUTH_TOKEN_PATH" ] || (umask 077; "$PY" -c 'import secrets; print(secrets.token_hex(32))' > "$RAY_AUTH_TOKEN_PATH"); }

# Time limits add up to 550 s. On one H100 (first run, 20,000 images, a Ray start per part):
# data 8 s, bare parts 23/31/38 s, logits passes 50/67 s; distillation ran past 85/80 s. On
# one H200 (60,000 images, one Ray head): data 8 s, bare 24/31/36 s, logits 50 s / 70 s (the
# ViT-L part printed its rows, then its driver's Ray shutdown hung until the limit), both
# distillation parts past 115 s (one decode task fed the student; fixed since).
part 45 data
part 30 targets
if [ -z "${GPU_CHECK_DRY:-}" ]; then
    part 35 bare vit_b
    part 40 bare vit_l
    part 40 bare_train
fi
if [ "$HAVE_RAY" = 1 ]; then
    RAY=("$PY" -m ray.scripts.scripts)
    # Without the dashboard, Ray Train V2's PlacementGroupCleaner logs "Failed to query Ray
    # Train Controller actor state" every few seconds (it polls the state API, which the
    # dashboard serves; ~140 lines a run): noise only, left as is (the carried wheels are not
    # known to hold the dashboard's dependencies).
    "${RAY[@]}" start --head --disable-usage-stats --include-dashboard=false \
        --num-gpus "$GPU_CHECK_GPUS" > "$GPU_CHECK_OUT/ray-start.log" 2>&1 \
        && export RAY_ADDRESS=auto || note "ray start failed: each part starts its own Ray"
    # ViT-B outruns the decode cores (~10k img/s against ~9k on 16 cores): its pass takes the
    # decode actor pool a long pass (~740k rows and up on 16 cores) gets; ViT-L is the model's
    # own limit: ktray's choice for this short pass (one-off decode tasks)
    part 60 logits vit_b actors
    part 70 logits vit_l
    part 115 distill targets
    part 115 distill online
    # Not in the default run (~2 minutes, CPU only): which decode stage a pass should take on
    # this node's cores. decode_tasks.TASK_SHARDS_PER_SLOT (24 shards a decode slot) was set
    # from a 2-core machine's actor start-up; GPU_CHECK_ONLY=inputs measures both stages here
    # (224-px views of 288-px JPEGs into a no-op model actor, against plain decoding on every
    # core, benchmarks/infer_input_bench.py).
    if [[ " ${GPU_CHECK_ONLY:-} " == *" inputs "* ]]; then
        for d in tasks actors; do
            t0=$(date +%s)
            timeout 150 "$PY" benchmarks/infer_input_bench.py --side 288 --size 224 \
                --rows "${GPU_CHECK_INPUT_ROWS:-120000}" --repeat 1 --decode "$d" 2>&1 \
                | grep -E -A 9 'where the time went|^[0-9]+ views' \
                || note "inputs ($d decode) failed or past 150s"
            note "inputs ($d decode): $(( $(date +%s) - t0 ))s"
        done
    fi
    "${RAY[@]}" stop --force > /dev/null 2>&1
else
    note "SKIPPED the logits and distillation passes: no ray (and no .whl/ray-*.whl to install)"
fi
"$PY" benchmarks/gpu_check.py table
note "total $(( $(date +%s) - START ))s"
