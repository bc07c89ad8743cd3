"""isubg: train, evaluate, tune and size a three-branch VQA model on GQA and VQA v2.

Importing the package is cheap on purpose: it does not import torch, so `isubg --help` and
`isubg preset ...` answer at once. Heavy modules are imported by the commands that need them.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
