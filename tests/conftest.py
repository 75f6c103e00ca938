"""Test-session setup: 8 emulated CPU devices, so sharding code runs on a real (fsdp, tensor) mesh on any machine.

This must happen before jax is imported anywhere; unsharded tests simply run on device 0.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
