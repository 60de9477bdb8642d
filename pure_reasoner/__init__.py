"""The import namespace of pure-reasoner: ``pure_reasoner.moe``, ``.kernels``, ``.train``, ``.benchmarks``.

The subpackages are the repository's top-level folders (``moe/``, ``kernels/``, ``train/``, ``benchmarks/``).
An installed copy (``pip install .``) holds them inside this package (setup.py's ``package_dir``); in a source
checkout (an editable install, or the repository root on ``PYTHONPATH``) they are found beside this folder. So
no top-level name of ours can be shadowed by another distribution's (Hugging Face's ``kernels``, for one).
"""

from pathlib import Path

_HERE = Path(__file__).resolve().parent
if not (_HERE / "moe").is_dir():  # a source checkout: the subpackages are the folders next to this one
    __path__.append(str(_HERE.parent))  # noqa: F821  (a package's __path__ is defined by the import system)
