"""UniQL: adaptive LLM inference for edge GPUs.

The subpackages live in the repository's top-level folders (DESIGN.md section 2):
``uniql.kernels``, ``uniql.runtime``, ``uniql.compressor``, ``uniql.server``.
"""

__version__ = "0.1.0"
