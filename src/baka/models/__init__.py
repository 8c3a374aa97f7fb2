"""Model I/O for SD1.x: single files, diffusers folders, VAEs, conversion, block maps, tiny models.

Submodules are imported on use; ``from baka.models import io`` etc.
"""
