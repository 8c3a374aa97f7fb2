"""Generation with A1111 conventions on diffusers: prompt syntax, embeddings, clip skip, samplers,
FreeU, LoRA/LyCORIS with block weights, infotext. Entry point: :class:`baka.generate.engine.Generator`."""
