"""Diffusion: the transformer's conditioning from a batch, and flow-matching samplers (Euler with CFG)."""
