"""Reusable code behind the PatchSearch / PoisonCAM notebooks.

One module per pipeline stage (``attack`` ...), over lower-level modules (``data``, ``kernels``,
``params``, ``cache``, ``io``). Dependencies run one way: notebooks -> helpers; a stage module never
imports a later stage.

bf16 on a CPU runs through oneDNN, which picks its kernels by the CPU's instruction set: AMX tiles
(recent Intel Xeons) round differently from AVX-512 BF16 (the AMD EPYC the shipped results were made on),
enough to move images between k-means clusters, so that a clustering computed there would not be the one
the shipped searches were made on. oneDNN is capped at AVX-512 BF16 (``ONEDNN_MAX_CPU_ISA``, read once,
at oneDNN's first use) unless the caller set the variable: the same results on either CPU.
"""

import os

os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")

__version__ = "0.1.0"
