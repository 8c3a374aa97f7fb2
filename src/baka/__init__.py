"""baka: a Stable Diffusion 1.x toolkit for model authors.

Importing this package does no work: subpackages (``baka.models``, ``baka.merge``, ...) are imported
on demand and the heavy libraries (torch, diffusers, transformers) only when they are used.
"""

__version__ = "0.1.0"
