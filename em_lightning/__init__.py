"""em-lightning: live emergent-misalignment model organisms on Lightning."""

__version__ = "0.1.0"
