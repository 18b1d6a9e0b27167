"""Engines: the compiled outer iterations that several methods share (generator-adversarial,
inversion with a replay pool, distillation on selected real images) and the pieces every
distillation job needs (``common``). A method supplies its loss terms and settings to one of them."""
