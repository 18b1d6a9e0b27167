"""dfkd_jax: data-free knowledge distillation in JAX/Flax."""

__version__ = "0.1.0"
