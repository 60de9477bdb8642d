"""Training stack: Hydra entry point, data, DeepSpeed engine, checkpoints, evaluation."""

from pure_reasoner.toplevel import defer_to_installed

# Imported as a bare top-level name from the repository root: the installed package of that name wins.
defer_to_installed(__name__, __file__)
