"""Base layer: the process's rank and world size, a run's folder and outputs, atomic writes, checkpoints (reading, integrity), the resume fingerprint, its recorded config."""
