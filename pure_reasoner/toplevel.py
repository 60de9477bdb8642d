"""Our folders seen under their bare names: hand the name to the distribution that owns it.

In a source checkout, whatever runs from the repository root (``python -m pytest``, ``python -m
pure_reasoner.train``) has that root first on ``sys.path``, so ``import kernels`` inside another library finds
our ``kernels/`` folder before an installed ``kernels`` distribution (Hugging Face's, which transformers
imports). Each of our folders' ``__init__`` ends by calling ``defer_to_installed``: imported under its bare name, it
replaces itself in ``sys.modules`` with the installed package of that name, which the import statement then
returns. Imported as ``pure_reasoner.<name>`` (our own code, always), it does nothing.
"""

import importlib.machinery
import importlib.util
import sys
from pathlib import Path


def defer_to_installed(module_name: str, init_file: str) -> bool:
    """Put the installed package named ``module_name`` in ``sys.modules`` in place of our folder.

    Returns True when it did. False when ``module_name`` is ours (``pure_reasoner.<name>``) or when nothing else
    on ``sys.path`` (the repository root left out) provides it; our folder then stays what the name imports.
    """
    if "." in module_name:
        return False
    root = Path(init_file).resolve().parents[1]
    search = [entry for entry in sys.path if Path(entry or ".").resolve() != root]
    spec = importlib.machinery.PathFinder.find_spec(module_name, search)
    if spec is None or spec.loader is None:
        return False
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return True
