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
from .base.config import AdapterConfig
from .core.layer import AdapterLayer
from .core.controller import AdapterController, controller_for
from .integrations.peft_style import AdapterModel, BOFTModel, HRAModel, LoHaModel, LoKrModel, LoRAModel, OFTModel
from .integrations.pipeline import LycorisPipelineMixin, enable
from .tools.arithmetic import COMBINATION_TYPES, combine_adapters
from .tools.extract import extract_lora
from .tools.merged import load_merged, merge_adapter_files, save_merged
from .base.presets import PRESETS
from .base.registry import ALGORITHMS, config_from_dict, get_algorithm

#: PEFT's spellings, so PEFT code ports by changing the import
LoraConfig, LoraModel = LoRAConfig, LoRAModel

__version__ = "0.1.0"

__all__ = [
    "COMBINATION_TYPES", "combine_adapters", "extract_lora", "load_merged", "merge_adapter_files", "save_merged",
    "ALGORITHMS", "PRESETS", "AdapterConfig", "AdapterController", "AdapterLayer", "AdapterModel",
    "BOFTConfig", "BOFTModel", "HRAConfig", "HRAModel", "LoHaConfig", "LoHaModel", "LoKrConfig", "LoKrModel",
    "LoRAConfig", "LoRAModel", "LoraConfig", "LoraModel", "LycorisPipelineMixin", "OFTConfig", "OFTModel", "config_from_dict", "controller_for",
    "enable", "get_algorithm",
]
