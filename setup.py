"""qwen_flash_jax: few-step (4-NFE) DMD distillation of Qwen-Image 2.x in JAX/Flax."""

from setuptools import find_packages, setup

# The libtpu that `jax[tpu]==0.10.2` pins (jax's own metadata: `libtpu==0.0.42.*; extra == "tpu"`).
LIBTPU = "libtpu==0.0.42.*"

setup(
    name="qwen_flash_jax",
    version="0.1.0",
    description="Few-step DMD distillation of Qwen-Image 2.x for T2I and editing, in JAX/Flax",
    packages=find_packages(include=["qwen_flash_jax", "qwen_flash_jax.*"]),
    # The trained toy teachers, text encoder, judge and benchmark images (qwen_flash_jax/train/prebuilt.py).
    # The VLM judges' rubrics and the example bench's prompts (qwen_flash_jax/eval/vlm_rubrics.py, vlm_bench.py).
    package_data={"qwen_flash_jax": ["prebuilt_cache/**/*", "eval/rubrics/*", "eval/vlm_examples/*"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax",
        "orbax-checkpoint>=0.12",
        "grain",
        "ml-collections",
        "clu",
        "numpy",
        "ml_dtypes",
        "pillow",
        "transformers",
        "tensorflow-datasets",
        "safetensors>=0.8",  # what safetensors_checkpoint is tested with: safe_open(backend="pread")
        "array_record",
        # clu's metric writers need TensorFlow's summary ops and TensorBoard.
        "tensorflow-cpu",
        "tensorboard",
        "psutil",
        # The paper-findings suite's plots (`python -m qwen_flash_jax.sweep --suite=paper`).
        "matplotlib",
    ],
    extras_require={
        # Parity tests against the diffusers/transformers reference; torch 2.13.0 is the local CPU build. ruff is
        # pinned: another version may format the same code differently and fail `ruff format --check`.
        # libtpu describes TPU slices for `python -m qwen_flash_jax.aot` (tests/test_aot.py compiles for one); peft is
        # what diffusers' load_lora_weights needs to read an exported LoRA (tests/test_export.py).
        # nbclient and ipykernel run the notebooks through a Jupyter kernel (tests/test_notebooks.py).
        # pytest-xdist runs the suite on parallel workers (`pytest -n 2`); filelock lets them share the toy assets.
        "test": [
            "pytest",
            "pytest-xdist",
            "filelock",
            "portpicker",
            "torch==2.13.0",
            "diffusers>=0.42",
            "peft",
            "ruff==0.17.6",
            LIBTPU,
            "nbclient",
            "ipykernel",
        ],
        # Running on TPU VMs and compiling for TPU slices ahead of time.
        "tpu": [LIBTPU],
    },
)
