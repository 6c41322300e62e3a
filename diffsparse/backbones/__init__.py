"""Backbones: what differs between DiT, PixArt-alpha, FLUX and Wan2.1, as registry rows.

A backbone is a row of `registry.BACKBONES`: its transformer class, its cacheable units and their kinds, its token
grid, its default selector, how a sampling loop calls it, its example inputs, its tiny random builder, its stock
pipeline and its latent shape. May import: torch, diffusers, transformers, einops and `diffsparse.files`; nothing
else of diffsparse (everything else imports it).
"""
