"""The DMD updates' model FLOPs, counted from their traced passes at the expected student step k.

XLA's cost analysis counts a loop body once: the scanned transformer layers (`model.scan_layers`) and the backward
simulation's `fori_loop` over the student's steps contribute one iteration each, so its FLOPs and time for a DMD
step fall short by about the layer count. These counts are the matmul FLOPs of the passes an update runs,
traced (abstract arguments suffice: no compile, no device), with scans counted `length` times; `aot` and
`benchmarks/dmd_iteration.py` both report them. A Pallas kernel (splash attention) traces as one tile's body, so
`aot` counts attention on a dense-attention copy of the model: every query against every key, the usual convention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core

from qwen_flash_jax.diffusion import sampling


def matmul_flops(fn, *args) -> float:
    """2 * M * N * K summed over the matmuls (dot_general) of fn's jaxpr, scans counted `length` times, the larger
    branch of a `cond`. Counted from the traced program (`args` may be abstract), so the number is the same on every
    backend; elementwise work is left out."""

    def count(jaxpr):
        total = 0.0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                lhs, rhs = (v.aval.shape for v in eqn.invars)
                (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
                rhs_free = [d for i, d in enumerate(rhs) if i not in rhs_contract and i not in rhs_batch]
                total += 2.0 * np.prod(lhs) * np.prod(rhs_free)
                continue
            inner = 0.0
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(sub, jax_core.ClosedJaxpr):
                        sub_flops = count(sub.jaxpr)
                        inner = max(inner, sub_flops) if eqn.primitive.name == "cond" else inner + sub_flops
                    elif isinstance(sub, jax_core.Jaxpr):
                        inner += count(sub)
            total += inner * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
        return total

    return count(jax.make_jaxpr(fn)(*args).jaxpr)


def pass_flops(model, params, cond, latents) -> dict[str, float]:
    """Matmul FLOPs of the passes the updates are made of, on a batch of `cond` and `latents` (arrays or
    `jax.ShapeDtypeStruct`s): "fwd" one forward, "cached" one forward on step 0's cached text/condition prefix,
    "fwd2" one CFG forward on the doubled batch, "fb" one forward + backward."""
    t = jnp.full((latents.shape[0],), 0.5)

    def fwd(p, c, z):
        return sampling.velocity(model, p, c, z, t)[0]

    def fwd2(p, c, z):
        return sampling.velocity(model, p, c.pair(c), sampling.pair(z, z), sampling.pair(t, t))[0]

    def fwd_bwd(p, c, z):
        return jax.grad(lambda q: jnp.mean(sampling.velocity(model, q, c, z, t)[0] ** 2))(p)

    flops = {
        "fwd": matmul_flops(fwd, params, cond, latents),
        "fwd2": matmul_flops(fwd2, params, cond, latents),
        "fb": matmul_flops(fwd_bwd, params, cond, latents),
    }
    if model.config.causal_condition:
        extract = jax.eval_shape(
            lambda p, c, z: sampling.velocity(model, p, c, z, t, kv_cache_mode="extract")[1], params, cond, latents
        )
        flops["cached"] = matmul_flops(
            lambda p, c, z, prefix: sampling.velocity(model, p, c, z, t, prefix, "cached")[0],
            params,
            cond,
            latents,
            extract,
        )
    else:
        flops["cached"] = flops["fwd"]
    return flops


def update_costs(setup, passes: dict, categories, gan: bool) -> tuple[float, float]:
    """(critic update, generator update): the cost of the passes each runs at its expected student step k,
    weighting `passes` (`pass_flops`' keys: times or FLOPs of one forward, one forward on the cached prefix, one CFG
    forward on the doubled batch, one forward+backward) by how often each runs. The text encoder is not included.

    `categories`: the batch's condition indices into the guidance table (a teacher runs only at the k where one of
    them weights it above 0)."""
    fwd, cached, fwd2, fb = (passes[k] for k in ("fwd", "cached", "fwd2", "fb"))
    num_steps = len(setup.timesteps)
    causal = setup.model.config.causal_condition and num_steps > 1
    # Critic: the student's sample at k (steps 0..k-1 and its x0 at k); with the prefix cache step 0 runs in full
    # and the k later calls on the cache.
    probs = setup.critic_step_probs or (1.0 / num_steps,) * num_steps  # () = uniform
    critic_k = float(np.dot(np.arange(num_steps), probs))
    critic_sim = fwd + critic_k * cached if causal else (critic_k + 1) * fwd
    critic = critic_sim + (2 if gan else 1) * fb  # the fake score's loss (and the GAN term's on real samples)
    # Generator, k uniform: steps 0..k-1 only (none at k = 0), then the student's forward+backward at k.
    ks = np.arange(num_steps)
    gen_sim = np.mean([(k > 0) * fwd + max(k - 1, 0) * cached for k in ks]) if causal else np.mean(ks) * fwd
    guided = fwd2 if setup.cfg_scale != 1.0 else fwd
    # Decoupled: the conditional teachers (CFG 1) for the comparison, then both halves for the CFG term.
    per_teacher = fwd + (fwd2 if setup.cfg_scale != 1.0 else 0.0) if setup.schedule == "decoupled" else guided
    weights = np.asarray(setup.guidance)[:, np.asarray(categories)]  # (K, batch, M)
    active_teachers = np.mean(np.sum(np.any(weights > 0, axis=1), axis=-1))
    generator = gen_sim + fb + active_teachers * per_teacher + (fb if gan else fwd)  # + the fake score
    if setup.first_step_fm_weight:
        generator += guided  # the base teacher's guided velocity at the noise
    return critic, generator
