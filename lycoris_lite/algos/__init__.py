"""The algorithms. Importing this package registers each one, in this order (the order every list of
algorithms shows); a new algorithm is one new module listed here."""

from . import lora, loha, lokr, oft, boft, hra  # noqa: F401  isort: skip
