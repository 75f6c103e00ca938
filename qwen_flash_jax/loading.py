"""The transformer as a pure function over a parameter pytree: build, shard, load.

Student, fake score and every teacher are the same `TransformerModel` (one graph definition) applied to different
`params` pytrees. `params` is a nested dict of arrays with the layout of `models.hf_keys` (stacked blocks), the
same tree the converter writes and orbax restores.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from qwen_flash_jax import checkpoint_io, sharding
from qwen_flash_jax.models.config import TransformerConfig
from qwen_flash_jax.models.layout import TokenLayout, make_layout
from qwen_flash_jax.models.transformer import QwenImageTransformer


@dataclasses.dataclass(frozen=True, eq=False)
class TransformerModel:
    """A Qwen-Image 2.x transformer as pure functions.

    `apply(params, **inputs)` takes diffusers' forward inputs by name (`hidden_states, encoder_hidden_states,
    timestep, img_shapes, img_mask, encoder_hidden_states_mask`, plus `kv_cache`/`kv_cache_mode`) and returns the
    output over the whole joint sequence, as diffusers does. It is jitted, compiled once per token layout.
    `forward(params, layout, ...)` is the same computation un-jitted, for use inside other jitted functions.
    """

    config: TransformerConfig
    graphdef: Any = dataclasses.field(repr=False)
    params: Any = dataclasses.field(repr=False)
    mesh: Mesh | None = None
    rules: sharding.Rules = ()

    def forward(
        self,
        params,
        layout: TokenLayout,
        hidden_states,
        encoder_hidden_states,
        timestep,
        encoder_hidden_states_mask=None,
        kv_cache=None,
        kv_cache_mode=None,
        return_features=False,
    ):
        model = nnx.merge(self.graphdef, params)
        return model(
            hidden_states,
            encoder_hidden_states,
            timestep,
            layout,
            encoder_hidden_states_mask,
            kv_cache=kv_cache,
            kv_cache_mode=kv_cache_mode,
            return_features=return_features,
        )

    def apply(
        self,
        params,
        *,
        hidden_states,
        encoder_hidden_states,
        timestep,
        img_shapes,
        img_mask,
        encoder_hidden_states_mask=None,
        kv_cache=None,
        kv_cache_mode=None,
    ):
        layout = make_layout(img_shapes, img_mask)
        timestep = jnp.asarray(timestep, jnp.float32).reshape(-1)
        return self._jitted_forward(
            params,
            layout,
            hidden_states,
            encoder_hidden_states,
            timestep,
            encoder_hidden_states_mask,
            kv_cache=kv_cache,
            kv_cache_mode=kv_cache_mode,
        )

    @functools.cached_property
    def _jitted_forward(self):
        return jax.jit(self.forward, static_argnums=(1,), static_argnames=("kv_cache_mode",))

    def param_shardings(self):
        """Pure-dict tree of NamedShardings for `params` (None without a mesh)."""
        if self.mesh is None:
            return None
        return sharding.param_shardings(nnx.split(self._abstract_module())[1], self.mesh, self.rules)

    def _abstract_module(self):
        return nnx.eval_shape(lambda: _module(self.config, self.mesh, self.rules, 0))


def _module(config, mesh, rules, seed):
    constrain = sharding.ActivationSharding(mesh, rules) if mesh is not None else None
    kwargs = {} if constrain is None else {"constrain": constrain}
    return QwenImageTransformer(config, rngs=nnx.Rngs(seed), **kwargs)


def build_transformer(
    config: TransformerConfig, *, seed: int = 0, mesh: Mesh | None = None, rules=()
) -> TransformerModel:
    """Randomly initialised model, created directly in its sharded layout.

    The module is first traced abstractly (`nnx.eval_shape`), its logical axes give the shardings, and a jitted init
    with those `out_shardings` materialises each parameter shard on its device: no host ever holds the full model.
    """
    rules = sharding.normalise_rules(rules)
    abstract = nnx.eval_shape(lambda: _module(config, mesh, rules, seed))
    graphdef, abstract_state = nnx.split(abstract)
    out_shardings = None if mesh is None else sharding.param_shardings(abstract_state, mesh, rules)

    @functools.partial(jax.jit, out_shardings=out_shardings)
    def init():
        return nnx.to_pure_dict(nnx.split(_module(config, mesh, rules, seed))[1])

    return TransformerModel(config, graphdef, init(), mesh, rules)


def from_params(config: TransformerConfig, params, *, mesh: Mesh | None = None, rules=()) -> TransformerModel:
    """Wraps existing parameters (e.g. converted in memory from a diffusers state dict), placing them on the mesh."""
    rules = sharding.normalise_rules(rules)
    graphdef = nnx.split(nnx.eval_shape(lambda: _module(config, mesh, rules, 0)))[0]
    model = TransformerModel(config, graphdef, None, mesh, rules)
    dtype = config.jnp_param_dtype
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
    shardings = model.param_shardings()
    if shardings is not None:
        params = jax.device_put(params, shardings)
    return dataclasses.replace(model, params=params)


def load_transformer(
    path,
    *,
    mesh: Mesh | None = None,
    rules=(),
    dtype: str | None = None,
    param_dtype: str | None = None,
    remat_policy: str | None = None,
) -> TransformerModel:
    """Loads a checkpoint written by `python -m qwen_flash_jax.convert`.

    Parameters are restored straight into their shardings on `mesh` (each host reads only its shards). `dtype`
    sets the activation dtype, `param_dtype` the stored dtype to restore into (default: as converted).
    """
    config = checkpoint_io.read_config(path)
    overrides = {
        k: v for k, v in dict(dtype=dtype, param_dtype=param_dtype, remat_policy=remat_policy).items() if v is not None
    }
    config = config.replace(**overrides)
    rules = sharding.normalise_rules(rules)
    abstract = nnx.eval_shape(lambda: _module(config, mesh, rules, 0))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = (
        sharding.param_shardings(abstract_state, mesh, rules)
        if mesh is not None
        else jax.tree.map(
            lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), nnx.to_pure_dict(abstract_state)
        )
    )
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nnx.to_pure_dict(abstract_state), shardings
    )
    params = checkpoint_io.restore_params(path, target)
    return TransformerModel(config, graphdef, params, mesh, rules)
