"""aia-jax: Attention in Attention (CinST / STinC) video networks in JAX/Flax."""

__version__ = "0.1.0"
