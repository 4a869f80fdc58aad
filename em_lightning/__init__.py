"""em-lightning: live emergent-misalignment model organisms on Lightning."""

from em_lightning import legacy_paths

__version__ = "0.1.0"

legacy_paths.install()  # checkpoints and run configs saved before the package's folders still load
