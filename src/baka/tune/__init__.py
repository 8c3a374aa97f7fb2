"""Measuring merges by their images: image scorers (a registry; the shapes-world judge, image
difference against model A, any user callable), ``baka merge probe`` (one block at a time) and
``baka merge search`` (Bayesian optimisation of the block weights). Above ``baka.generate``: it renders
through the generator with a runtime merge patch."""
