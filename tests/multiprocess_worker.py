"""One process of the multi-process test (run by tests/test_multiprocess.py, not collected by pytest).

Joins a 2-process jax.distributed cluster on localhost (gloo CPU collectives), reads this process's shard of the
grain pipeline, assembles global arrays on a mesh spanning both processes, and runs a sharded transformer forward
and a global reduction. Prints one JSON line with what it saw.
"""

import json
import sys


def main():
    coordinator, process_id = sys.argv[1], int(sys.argv[2])
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes=2, process_id=process_id)
    import jax.numpy as jnp
    import numpy as np

    from qwen_flash_jax import sharding
    from qwen_flash_jax.data import pipeline
    from qwen_flash_jax.loading import build_transformer
    from qwen_flash_jax.models import TransformerConfig, make_layout
    from qwen_flash_jax.models.codec import SpaceToDepthCodec
    from qwen_flash_jax.text.tokenizer import train_tokenizer
    from tests.helpers import SIZE, pipeline_config, world_records

    sources = {"t2i": {c: world_records("t2i", c, 12, 0) for c in pipeline.CATEGORIES["t2i"]}}
    tokenizer = train_tokenizer([r["caption"] for recs in sources["t2i"].values() for r in recs], vocab_size=1024)
    data = pipeline.build_pipeline(
        pipeline_config(task_ratio="1:0", batch_size=8), sources, tokenizer, SpaceToDepthCodec(patch=4)
    )
    mesh = sharding.make_mesh([("fsdp", -1)])
    rules = (("batch", "fsdp"), ("embed", "fsdp"))
    local = next(iter(data))
    local.pop("task")
    batch = pipeline.to_global(local, sharding.batch_sharding(mesh, rules))
    latents = batch["target_latents"]  # (8, tokens, 48), each process holds 4 rows

    config = TransformerConfig(
        num_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        in_channels=48,
        out_channels=48,
        context_in_dim=8,
        axes_dims_rope=(4, 6, 6),
    )
    model = build_transformer(config, seed=0, mesh=mesh, rules=rules)
    tokens = latents.shape[1]
    slot_mask = np.array([False] * 4 + [True] * (tokens // 4))
    layout = make_layout([[(1, SIZE // 4, SIZE // 4)]], slot_mask)
    text = jax.device_put(jnp.ones((8, 4, 8)), sharding.batch_sharding(mesh, rules))
    out = jax.jit(lambda p, x, e: model.forward(p, layout, x, e, jnp.full((8,), 0.5)))(model.params, latents, text)
    print(
        json.dumps(
            {
                "process": jax.process_index(),
                "devices": jax.device_count(),
                "local_rows": [s.data.shape[0] for s in latents.addressable_shards],
                "global_shape": list(latents.shape),
                "latent_sum": float(jax.jit(jnp.sum)(latents)),
                "output_sum": float(jax.jit(jnp.sum)(out)),
                "local_first": float(np.asarray(local["target_latents"])[:, 0, 0].sum()),
            }
        )
    )


if __name__ == "__main__":
    main()
