"""Reusable code behind the PatchSearch / PoisonCAM notebooks.

One module per pipeline stage (``attack`` ...), over lower-level modules (``data``, ``kernels``,
``params``, ``cache``, ``io``). Dependencies run one way: notebooks -> helpers; a stage module never
imports a later stage.
"""

__version__ = "0.1.0"
