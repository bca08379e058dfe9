"""What the web UI does, without the UI: one shared pipeline serving many sessions' adapter stacks.

``ui/app.py`` is a Gradio page over this package; everything here is plain Python and testable alone.

* :mod:`.tags`: a session's stack (:class:`StackEntry`), AUTOMATIC1111's ``<lora:name:w>`` prompt tags
  (:func:`parse_prompt`) and its "parameters" text (:func:`format_parameters` / :func:`parse_parameters`).
* :mod:`.library`: the adapters folder as cards (:class:`AdapterLibrary`), safe upload names and the
  example adapters for the tiny models.
* :mod:`.settings`: what a session asks for (:class:`GenerationSettings`) and gets (:class:`GenerationResult`).
* :mod:`.engine`: :class:`SharedPipeline`, the pipeline every session shares, changed under one lock.
* :mod:`.values`: page values as numbers, or a ``ValueError`` naming the field.
* :mod:`.access`: who may do what on a shared server (rate-limited logins, admins, upload quotas).
"""

from .access import Accounts, UploadQuota
from .engine import SharedPipeline
from .library import (EXAMPLES, EXAMPLES_DIR, FAMILIES, AdapterCard, AdapterLibrary, adapter_name, addnet_hash,
                      algorithm_names, preview_destination, preview_of, read_card, safe_adapter_filename,
                      search_cards, write_example_adapters)
from .settings import (DEFAULT_SCHEDULER, MAX_SEED, SCHEDULERS, GenerationCancelled, GenerationResult,
                       GenerationSettings)
from .tags import (StackEntry, effective_stack, format_block_weights, format_parameters, insert_tag,
                   parse_block_weights, parse_parameters, parse_prompt)

__all__ = ["DEFAULT_SCHEDULER", "EXAMPLES", "EXAMPLES_DIR", "FAMILIES", "MAX_SEED", "SCHEDULERS", "Accounts",
           "AdapterCard", "AdapterLibrary", "GenerationCancelled", "GenerationResult", "GenerationSettings",
           "SharedPipeline", "StackEntry", "UploadQuota", "addnet_hash", "adapter_name", "algorithm_names", "effective_stack",
           "format_block_weights", "format_parameters", "insert_tag", "parse_block_weights", "parse_parameters",
           "parse_prompt", "preview_destination", "preview_of", "read_card", "safe_adapter_filename", "search_cards",
           "write_example_adapters"]
