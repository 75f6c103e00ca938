#!/usr/bin/env bash
# The DMD-iteration benchmark on one GPU; logs go to $OUT (or /tmp) too. Run from the repository root.
#   bash benchmarks/gpu_dmd_iteration.sh
#       the toy config, then a 263M-parameter model in bfloat16 (8 layers, 1536 wide, 1024 image + 320 text tokens,
#       batch 16) against an 8192^3 bfloat16 matmul
#   bash benchmarks/gpu_dmd_iteration.sh 1b [FLAG ...]
#       the full-scale config (configs/5to5.py) at 5 of its 32 layers: 1.21B parameters, 1024^2 images (4096 image
#       + 500 text tokens), batch 8, bfloat16, on synthetic inputs with a random toy text encoder; cuDNN flash
#       attention (attention "auto" on a GPU), then the dense attention, each in its own process (so that the peak
#       memory is that attention's); per update time, matmul FLOPs, TFLOP/s and MFU against the H200's bfloat16
#       dense peak (989 TFLOP/s). FLAGs are passed on to benchmarks/dmd_iteration.py after these (later ones win).
set -uo pipefail
out=${OUT:-/tmp}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv 2>/dev/null
bench=(python3 benchmarks/dmd_iteration.py)
quiet() { grep --line-buffered -v "^[IW][0-9]"; }

if [[ ${1:-} == 1b ]]; then
  shift
  full=(--config=configs/5to5.py --inputs=synthetic --nopasses --repeats=8 --config.model.num_layers=5
        --config.text_encoder.kind=toy --config.model.context_in_dim=64 --config.data.batch_size=8
        --matmul_size=8192 --matmul_dtype=bfloat16 --peak_tflops=989)
  status=0
  for attention in auto dense; do
    "${bench[@]}" "${full[@]}" --attention=$attention "$@" 2>&1 | quiet | tee "$out/1b_$attention.log" || status=1
  done
  exit $status
fi

mid=(--config.model.dtype=bfloat16 --config.model.num_layers=8 --config.model.num_attention_heads=12
     --config.model.attention_head_dim=128 "--config.model.axes_dims_rope=(16,56,56)" --config.data.image_size=128
     --config.data.max_prompt_tokens=320 --matmul_size=8192 --matmul_dtype=bfloat16)
"${bench[@]}" --repeats=5 2>&1 | quiet | tee "$out/toy.log"
"${bench[@]}" --repeats=5 "${mid[@]}" 2>&1 | quiet | tee "$out/mid.log"
"${bench[@]}" --repeats=5 "${mid[@]}" --config.fake_score.updates_per_student=1 2>&1 | quiet | tee "$out/mid_ratio1.log"
