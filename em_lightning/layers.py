"""The layer of every top-level package of em_lightning: the one source ARCHITECTURE.md describes and
tests/test_architecture.py enforces. A module may import from a lower layer, or from its own package; within
the libraries layer the sub-ranks order the packages (``evaluation`` uses ``judges``, ``probes`` uses
``evaluation``, ...). Libraries and the base never import Lightning."""

BASE, LIBRARIES, LIGHTNING, COMMANDS, CLI = 2, 3, 4, 5, 6

LAYERS: dict[str, float] = {
    # base: no Lightning, no other em_lightning layer
    "": BASE, "layers": BASE, "legacy_paths": BASE, "model": BASE, "training": BASE, "run": BASE, "published": BASE,
    "testing": BASE,
    # libraries: no Lightning; the fraction orders them
    "judges": LIBRARIES, "phase": LIBRARIES, "evaluation": LIBRARIES + 0.1, "demos": LIBRARIES + 0.1,
    "probes": LIBRARIES + 0.2, "report": LIBRARIES + 0.2, "sweep": LIBRARIES + 0.3, "defenses": LIBRARIES + 0.3,
    # the Lightning layer: the module, the data module, strategies, events; the run logger; callbacks
    "lit": LIGHTNING, "loggers": LIGHTNING, "callbacks": LIGHTNING,
    "commands": COMMANDS,
    "cli": CLI,
}

# Packages whose modules must not import each other (each talks to its peers through events or a library).
NO_PEER_IMPORTS = ("callbacks", "commands")
