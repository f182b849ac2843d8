"""UniQL: adaptive LLM inference for edge GPUs.

The subpackages live in the repository's top-level folders (DESIGN.md section 2):
``uniql.kernels``, ``uniql.runtime``, ``uniql.compressor``, ``uniql.server``.
"""

import os
import sys

__version__ = "0.1.0"


def _unshadow_checkout_root() -> None:
    """Drop the checkout's root from sys.path.

    `python -m uniql.cli` (and `accelerate launch -m uniql.cli`) from the repository root puts the root first on
    sys.path, where the folder `kernels/` (installed as `uniql.kernels`) shadows PyPI's `kernels`, which
    transformers >= 5.25 imports. Nothing is imported from the root itself: every folder there is reached as
    `uniql.*` through the install, so the entry only ever does harm."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not os.path.isfile(os.path.join(root, "kernels", "__init__.py")):
        return  # an installed wheel: no checkout around us
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != os.path.realpath(root)]


_unshadow_checkout_root()
