"""lycoris-lite: LyCORIS-style adapters (LoRA, LoHa, LoKr, OFT, BOFT, HRA) for diffusers.

Public API::

    from lycoris_lite import HRAConfig, HRAModel
    pipe.unet = HRAModel(pipe.unet, HRAConfig(r=8, target_modules=["to_q", "to_v"]), "default")
"""

from .algos.boft import BOFTConfig
from .algos.hra import HRAConfig
from .algos.loha import LoHaConfig
from .algos.lokr import LoKrConfig
from .algos.lora import LoRAConfig
from .algos.oft import OFTConfig
from .config import AdapterConfig
from .layer import AdapterLayer
from .model import (
    AdapterController,
    AdapterModel,
    BOFTModel,
    HRAModel,
    LoHaModel,
    LoKrModel,
    LoRAModel,
    OFTModel,
    controller_for,
)
from .pipeline import LycorisPipelineMixin, enable
from .arithmetic import COMBINATION_TYPES, combine_adapters
from .extract import extract_lora
from .merge import load_merged, merge_adapter_files, save_merged
from .presets import PRESETS
from .registry import ALGORITHMS, config_from_dict, get_algorithm

__version__ = "0.1.0"

__all__ = [
    "COMBINATION_TYPES", "combine_adapters", "extract_lora", "load_merged", "merge_adapter_files", "save_merged",
    "ALGORITHMS", "PRESETS", "AdapterConfig", "AdapterController", "AdapterLayer", "AdapterModel",
    "BOFTConfig", "BOFTModel", "HRAConfig", "HRAModel", "LoHaConfig", "LoHaModel", "LoKrConfig", "LoKrModel",
    "LoRAConfig", "LoRAModel", "LycorisPipelineMixin", "OFTConfig", "OFTModel", "config_from_dict", "controller_for",
    "enable", "get_algorithm",
]
