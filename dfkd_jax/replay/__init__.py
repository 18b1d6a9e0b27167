"""Replaying trajectories recorded by running the reference PyTorch code itself.

A trajectory fixture is a folder (format: ``docs/fidelity.md``) holding the reference's initial
weights (``init_*.pth``), every random value it consumed (``draws.npz``), the settings in effect
(``config.json``) and what it computed at every sub-step (``trace.npz``). ``replay(folder)`` runs
the same iterations through the production method code, feeding the recorded draws to each
``run.job.Phase``'s ``apply`` instead of its ``draw``, and compares every recorded quantity:

  fixture   reading a folder (``Fixture``)
  compare   relative errors against the reference, the report (``Report``)
  harness   what every adapter shares: a one-device job, its phases' ``apply`` compiled, weights
            in and out by the reference's key names
  adapters  one module per reference family: what its config means in dfkd_jax, how its draws map
            onto a method's ``draw`` pytree, which trace entry is which of our quantities

Command line: ``python -m dfkd_jax.replay FIXTURE_DIR [--tolerance R]`` (``__main__``).
"""
