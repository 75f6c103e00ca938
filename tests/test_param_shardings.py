"""Golden dump of the full-scale transformer's parameter shardings under configs/5to5.py's mesh rules.

The full-size network is traced abstractly (`nnx.eval_shape`: no weights) and every parameter's shape, logical axes
and PartitionSpec on the config's mesh over GOLDEN_DEVICES devices is compared with
tests/golden/param_shardings_5to5.json. A change to the rules, the mesh axes or a parameter's logical axes fails here
and shows up in review as a diff of that file. After an intended change, regenerate it and commit the diff:

    python3 -m tests.test_param_shardings --update
"""

import json
import pathlib
import sys

from flax import nnx

from qwen_flash_jax import atomic, config_lib, sharding
from qwen_flash_jax.models.transformer import QwenImageTransformer

CONFIG = "configs/5to5.py"
GOLDEN = pathlib.Path(__file__).parent / "golden" / "param_shardings_5to5.json"
GOLDEN_DEVICES = 16  # e.g. a v5p-32 or v6e-16 slice; the config's -1 mesh axis takes what the others leave


def _spec_entry(axes):
    return list(axes) if isinstance(axes, tuple) else axes


def param_shardings_dump() -> dict:
    """{config, devices, mesh, rules, parameters, params: {path: {shape, logical, spec}}} of the full config."""
    config = config_lib.load_config(CONFIG)
    rules = config_lib.mesh_rules(config)
    mesh = sharding.abstract_mesh(tuple(tuple(a) for a in config.mesh.axes), GOLDEN_DEVICES)
    model_config = config_lib.transformer_config(config)
    state = nnx.split(nnx.eval_shape(lambda: QwenImageTransformer(model_config, rngs=nnx.Rngs(0))))[1]
    shardings = nnx.traversals.flatten_mapping(sharding.param_shardings(state, mesh, rules))
    params, total = {}, 0
    for path, variable in nnx.to_flat_state(state):
        logical = variable.get_metadata().get("out_sharding") or (None,) * len(variable.shape)
        params["/".join(map(str, path))] = {
            "shape": list(variable.shape),
            "logical": list(logical),
            "spec": [_spec_entry(axes) for axes in shardings[path].spec],
        }
        total += int(variable.size)
    return {
        "config": CONFIG,
        "devices": GOLDEN_DEVICES,
        "mesh": dict(mesh.shape),
        "rules": [[logical, _spec_entry(axes)] for logical, axes in rules],
        "parameters": total,
        "params": params,
    }


def _render(dump: dict) -> str:
    """JSON with one line per header field and per parameter, so that a review diff names the changed ones."""
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in dump.items() if k != "params"]
    params = [f"    {json.dumps(k)}: {json.dumps(v)}" for k, v in dump["params"].items()]
    return "{\n" + "\n".join(lines) + '\n  "params": {\n' + ",\n".join(params) + "\n  }\n}\n"


def test_the_full_configs_parameter_shardings_match_the_golden_dump():
    dump = json.loads(_render(param_shardings_dump()))  # through JSON: tuples become lists, as in the file
    golden = json.loads(GOLDEN.read_text())
    changed = sorted(
        name
        for name in set(dump["params"]) | set(golden["params"])
        if dump["params"].get(name) != golden["params"].get(name)
    )
    header = {k: v for k, v in dump.items() if k != "params"}
    assert header == {k: v for k, v in golden.items() if k != "params"} and not changed, (
        f"parameter shardings differ from {GOLDEN.name} in {changed or 'the header'}; if intended, regenerate it: "
        "python3 -m tests.test_param_shardings --update"
    )


def test_the_golden_dump_shards_every_large_parameter():
    """What the golden file pins is a layout that fits: every parameter over 1M elements is split by fsdp."""
    golden = json.loads(GOLDEN.read_text())
    assert golden["parameters"] > 7e9
    for name, entry in golden["params"].items():
        size = 1
        for d in entry["shape"]:
            size *= d
        if size > 1 << 20:
            assert any(a == "fsdp" or (isinstance(a, list) and "fsdp" in a) for a in entry["spec"]), name


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit("usage: python3 -m tests.test_param_shardings --update")
    with atomic.publish(GOLDEN) as staged:
        staged.write_text(_render(param_shardings_dump()))
    print(f"wrote {GOLDEN}")
