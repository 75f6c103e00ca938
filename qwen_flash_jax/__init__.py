"""qwen_flash_jax: few-step distillation of Qwen-Image 2.x in JAX/Flax.

`load_transformer(path)` loads a checkpoint written by `python -m qwen_flash_jax.convert`;
`Pipeline.from_pretrained(folder)` runs a diffusers Qwen-Image 2.1 pipeline folder as `QwenImage21Pipeline` does.

Layers, bottom to top; a module imports only from its own layer's lower modules and from layers below
(tests/test_layering.py checks that no modules or packages import each other):
    errors, flow, sharding, cache,                        one-line errors, flow-matching math, meshes, the cache,
    safetensors_checkpoint                                streaming safetensors reads
    models, config_lib, checkpoint_io, loading, convert,  networks, configs, checkpoints, TPU slices
    topologies
    training_loop                                         the one training loop: steps, logging, checkpoints, probes
    text                                                  tokenizers, prompt template, text encoders
    data                                                  the toy world, dataset sources, the input pipeline
    diffusion                                             conditioning from a batch, samplers
    distill                                               the DMD2 objective and its jitted steps
    eval                                                  judges, generation, benchmark reports
    train                                                 assets, the teacher and distillation jobs, job dispatch
    distilled, lora                                       a trained student read back from its workdir; LoRA by SVD
    pipeline                                              a diffusers pipeline folder end to end
    main, sweep, inspect_data, aot, generate, export      command lines
"""

import importlib

from qwen_flash_jax.loading import TransformerModel, build_transformer, from_params, load_transformer


def __getattr__(name):
    # `Pipeline` loads on first use: importing it here would import the converter with the package, and then
    # `python -m qwen_flash_jax.convert` would run a module already imported (runpy warns on stderr).
    if name == "Pipeline":
        return importlib.import_module("qwen_flash_jax.pipeline").Pipeline
    raise AttributeError(f"module 'qwen_flash_jax' has no attribute {name!r}")


__all__ = ["Pipeline", "TransformerModel", "build_transformer", "from_params", "load_transformer"]
