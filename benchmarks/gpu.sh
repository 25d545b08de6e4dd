#!/usr/bin/env bash
# Every GPU table of docs/benchmarks.md, each command under a hard time cap (14.4 minutes in all: over one device
# call's 10, so run it as two calls: GPU_SH_ONLY="attention clip_b16 beit3_large ctl_resnet50", then
# GPU_SH_ONLY="topk bert_base uit_swinb blip2_embed vse_infty pipeline"),
# logs under $OUT (the device tool's folder; ./gpu_logs elsewhere). Run from the repository root:
#   bash benchmarks/gpu.sh                  # on the GPU machine, after benchmarks/gpu_wheels.sh filled .whl/ here
#   GPU_SH_TINY=1 bash benchmarks/gpu.sh    # the same commands on tiny models: checks the script on a CPU
#   GPU_SH_ONLY="uit_swinb pipeline" bash benchmarks/gpu.sh   # only the named tables
# summary.log gathers each command's table and exit status; <name>.log holds its whole output.
set -u -o pipefail
OUT=${OUT:-gpu_logs}
mkdir -p "$OUT"
if [ -d .whl ] && ! python3 -c 'import grain, open_clip, torchscale' 2>/dev/null; then  # what the GPU image lacks
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}  # shared by the steps, not kept

run() {  # run NAME CAP_SECONDS COMMAND...
  local name=$1 cap=$2
  shift 2
  if [ -n "${GPU_SH_ONLY:-}" ] && [[ " $GPU_SH_ONLY " != *" $name "* ]]; then return; fi
  echo "== $name (cap ${cap} s): $*" >>"$OUT/summary.log"
  local began=$SECONDS
  timeout --kill-after=10 "$cap" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  grep -E '^\||start-up|groups|rounds|jax [0-9]|agreement|exact top-k|not run|BERT-base|UIT|BLIP-2|JPEGs|index:|analytic' "$OUT/$name.log" >>"$OUT/summary.log"
  [ "$rc" -ne 0 ] && tail -n 5 "$OUT/$name.log" >>"$OUT/summary.log"
  echo "rc=$rc ($((SECONDS - began)) s)" >>"$OUT/summary.log"
}

if [ "${GPU_SH_TINY:-0}" = 1 ]; then
  clip=(--model tiny --batch 8 --steps 2 --warmup 1) beit3=(--model beit3_tiny --batch 4 --steps 2 --warmup 1)
  ctl=(--tiny --batch 8 --steps 2 --warmup 1) attention=(--steps 2 --scale 0.02) torch_sides=jax,torch
  topk=(--queries 2000 --gallery 20000 --dim 64 --k 10,100 --rounds 1)
  bert=(--layers 2 --batch 8 --length 16 --steps 2 --warmup 1)
  uit=(--size tiny --batch 8 --steps 2 --warmup 1) blip2=(--size tiny --batch 8 --steps 2)
  vse=(--size tiny --batch 8 --steps 2 --warmup 1) pipeline=(--kinds jsonl --sizes 224 --workers 0 --batches 2)
else
  clip=(--model vit_b16 --batch 256 --steps 10 --warmup 3 --precision bf16 --peak-tflops 989)
  beit3=(--model beit3_large_patch16_384 --batch 32 --steps 5 --warmup 2 --precision bf16 --peak-tflops 989)
  ctl=(--batch 64 --steps 10 --warmup 3) attention=(--steps 20) torch_sides=jax,torch,torch-compile
  topk=(--queries 100000 --gallery 1000000 --dim 512 --k 10,100,1000 --rounds 2)
  bert=(--batch 64 --length 64 --steps 10 --warmup 3 --precision bf16 --peak-tflops 989)
  uit=(--size swinb --batch 64 --steps 5 --warmup 2 --precision bf16 --peak-tflops 989)
  blip2=(--size vitl --batch 256 --steps 5 --warmup 2 --precision bf16 --peak-tflops 989)
  vse=(--size base --batch 128 --steps 10 --warmup 3 --precision bf16 --peak-tflops 989)
  pipeline=(--kinds jsonl,webdataset --sizes 224 --workers 0,8,16 --modes full,fast --batches 20 --no-torch)
fi

{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
  python3 -c 'import jax, flax, torch; print("jax", jax.__version__, jax.devices(), "flax", flax.__version__,
  "torch", torch.__version__)'; } >"$OUT/summary.log" 2>&1
run attention 40 python3 benchmarks/attention.py "${attention[@]}"
run clip_b16 140 python3 benchmarks/train_step.py "${clip[@]}" --frameworks "$torch_sides"
run beit3_large 160 python3 benchmarks/train_step.py "${beit3[@]}" --frameworks jax,torch
run ctl_resnet50 50 python3 benchmarks/reid_train_step.py "${ctl[@]}"
run topk 100 python3 benchmarks/topk.py "${topk[@]}" --dtype bfloat16 --frameworks jax,jax-resident,torch,faiss
run bert_base 45 python3 benchmarks/bert_step.py "${bert[@]}"
run uit_swinb 120 python3 benchmarks/uit_step.py "${uit[@]}"
run blip2_embed 60 python3 benchmarks/blip2_embed.py "${blip2[@]}"
run vse_infty 60 python3 benchmarks/vse_step.py "${vse[@]}"
run pipeline 90 python3 benchmarks/pipeline.py "${pipeline[@]}"
cat "$OUT/summary.log"
