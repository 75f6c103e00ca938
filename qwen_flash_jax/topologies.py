"""Named TPU slices: chips, HBM and bf16 peak per chip, and their devices for an ahead-of-time compile.

`devices("v5p-16")` gives the slice's devices from libtpu's description of its topology
(`jax.experimental.topologies.get_topology_desc`), so a CPU host can compile for the slice without the hardware.

Chip facts are from Google Cloud's TPU pages (docs.cloud.google.com/tpu/docs/v4, v5p, v5e, v6e): peak bf16
TFLOP/s per chip and HBM per chip (v4 32 GiB, v5p 95 GiB, v5e 16 GB, v6e 32 GB; the table takes each as GiB, the
unit XLA's memory analysis reports). Slice names follow Cloud's accelerator types: v4 and v5p count TensorCores
(two per chip: v5p-16 is 8 chips), v5e and v6e count chips.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os

from qwen_flash_jax.models.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Chip:
    kind: str
    hbm_gib: float
    bf16_tflops: float
    # libtpu's `chip_config_name` for one device per chip: v4's two TensorCores are one (megacore) device, as JAX
    # runs v4; libtpu's default describes each core (32 devices for v4-32). v5p is megacore by default.
    chip_config: str = ""


CHIPS = {
    "v4": Chip("TPU v4", 32.0, 275.0, chip_config="megacore"),
    "v5p": Chip("TPU v5p", 95.0, 459.0),
    "v5e": Chip("TPU v5e", 16.0, 197.0),
    "v6e": Chip("TPU v6e", 32.0, 918.0),
}


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str  # the accelerator type, e.g. "v5p-16"
    topology: str  # what get_topology_desc takes, e.g. "v5p:2x2x2"
    chip: Chip

    @property
    def chips(self) -> int:
        return math.prod(int(n) for n in self.topology.split(":")[1].split("x"))

    @property
    def hbm_bytes(self) -> int:
        return int(self.chip.hbm_gib * 2**30)

    @property
    def peak_flops(self) -> float:
        """bf16 FLOP/s of one chip."""
        return self.chip.bf16_tflops * 1e12


SLICES = {
    s.name: s
    for s in (
        Slice("v4-8", "v4:2x2x1", CHIPS["v4"]),
        Slice("v4-32", "v4:2x2x4", CHIPS["v4"]),
        Slice("v4-64", "v4:2x4x4", CHIPS["v4"]),
        Slice("v5p-8", "v5p:2x2x1", CHIPS["v5p"]),
        Slice("v5p-16", "v5p:2x2x2", CHIPS["v5p"]),
        Slice("v5p-32", "v5p:2x2x4", CHIPS["v5p"]),
        Slice("v5p-64", "v5p:2x4x4", CHIPS["v5p"]),
        Slice("v5p-128", "v5p:4x4x4", CHIPS["v5p"]),
        Slice("v5e-8", "v5e:2x4", CHIPS["v5e"]),
        Slice("v5e-16", "v5e:4x4", CHIPS["v5e"]),
        Slice("v5e-64", "v5e:8x8", CHIPS["v5e"]),
        Slice("v5e-256", "v5e:16x16", CHIPS["v5e"]),
        Slice("v6e-8", "v6e:2x4", CHIPS["v6e"]),
        Slice("v6e-16", "v6e:4x4", CHIPS["v6e"]),
        Slice("v6e-64", "v6e:8x8", CHIPS["v6e"]),
        Slice("v6e-256", "v6e:16x16", CHIPS["v6e"]),
    )
}


def get(name: str) -> Slice:
    """A named slice ("v5p-16"), or a raw topology ("v5p:2x2x1", for small test slices)."""
    if name in SLICES:
        return SLICES[name]
    family, _, shape = name.partition(":")
    if family in CHIPS and shape and all(part.isdigit() and int(part) > 0 for part in shape.split("x")):
        return Slice(name, name, CHIPS[family])
    raise ConfigError(f"unknown TPU slice {name!r}; known: {', '.join(SLICES)} (or a topology such as 'v5p:2x2x1')")


def devices(slice_: Slice) -> list:
    """The slice's devices, from libtpu's topology description (no TPU needed)."""
    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError("libtpu is not installed; it describes TPU slices: pip install 'qwen_flash_jax[tpu]'")
    # Another process on this host may hold libtpu's lock file (it is taken whenever JAX loads libtpu); only the
    # topology description is needed here, not the chips. Outside a TPU VM there is no metadata server to ask.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    from jax.experimental import topologies as jax_topologies

    try:
        options = {"chip_config_name": slice_.chip.chip_config} if slice_.chip.chip_config else {}
        description = jax_topologies.get_topology_desc(topology_name=slice_.topology, platform="tpu", **options)
    except Exception as e:  # libtpu's own message names what it rejected
        raise ConfigError(f"libtpu cannot describe TPU slice {slice_.topology!r}: {' '.join(str(e).split())}") from None
    found = list(description.devices)
    if len(found) != slice_.chips:
        raise ConfigError(f"libtpu describes {len(found)} devices for {slice_.topology!r}, expected {slice_.chips}")
    return found
