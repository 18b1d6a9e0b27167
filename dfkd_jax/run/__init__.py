"""The run machinery: the one training loop and what it needs around it (job contract, mesh and
shardings, checkpoints, the workdir lock, outputs, evaluation, numerics guard, stop signals)."""
