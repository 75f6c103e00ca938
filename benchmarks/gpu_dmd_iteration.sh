#!/usr/bin/env bash
# The DMD-iteration benchmark on one GPU: the toy config, then a 263M-parameter model in bfloat16 (8 layers,
# 1536 wide, 1024 image + 320 text tokens, batch 16) against an 8192^3 bfloat16 matmul. Logs go to $OUT (or /tmp) too.
#   bash benchmarks/gpu_dmd_iteration.sh
set -uo pipefail
out=${OUT:-/tmp}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv 2>/dev/null
bench=(python3 benchmarks/dmd_iteration.py --repeats=5)
mid=(--config.model.dtype=bfloat16 --config.model.num_layers=8 --config.model.num_attention_heads=12
     --config.model.attention_head_dim=128 "--config.model.axes_dims_rope=(16,56,56)" --config.data.image_size=128
     --config.data.max_prompt_tokens=320 --matmul_size=8192 --matmul_dtype=bfloat16)
"${bench[@]}" 2>&1 | grep -v "^[IW][0-9]" | tee "$out/toy.log"
"${bench[@]}" "${mid[@]}" 2>&1 | grep -v "^[IW][0-9]" | tee "$out/mid.log"
"${bench[@]}" "${mid[@]}" --config.fake_score.updates_per_student=1 2>&1 | grep -v "^[IW][0-9]" |
  tee "$out/mid_ratio1.log"
