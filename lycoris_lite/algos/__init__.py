"""The algorithms. Importing this package registers each one; a new algorithm is one new module
listed here."""

from . import boft, hra, loha, lokr, lora, oft  # noqa: F401
