"""Concept erasing: ESD (Gandikota et al., ICCV 2023). Entry point: :func:`baka.erase.esd.erase`."""
