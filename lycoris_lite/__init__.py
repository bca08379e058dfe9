"""lycoris-lite: LyCORIS-style adapters (LoRA, LoHa, LoKr, OFT, BOFT, HRA, with DoRA) for diffusers.

The public API is the names below; everything else lives in the layered subpackages (see README's
"Layout") and may change. A diffusers pipeline gains ``load_adapter`` & co.:

>>> import lycoris_lite
>>> pipe = lycoris_lite.enable(pipe)
>>> pipe.load_adapter("style.safetensors", scale=0.8)

or PEFT-style:

>>> from lycoris_lite import HRAConfig, HRAModel
>>> pipe.unet = HRAModel(pipe.unet, HRAConfig(r=8, target_modules=["to_q", "to_v"]), "default")
"""

from .algos.boft import BOFTConfig
from .algos.hra import HRAConfig
from .algos.loha import LoHaConfig
from .algos.lokr import LoKrConfig
from .algos.lora import LoRAConfig
from .algos.oft import OFTConfig
from .base.config import AdapterConfig
from .base.presets import PRESETS
from .base.registry import ALGORITHMS, config_from_dict
from .core.controller import controller_for
from .integrations.peft_style import AdapterModel, BOFTModel, HRAModel, LoHaModel, LoKrModel, LoRAModel, OFTModel
from .integrations.pipeline import enable
from .io.files import load_adapter, save_adapter
from .tools.arithmetic import combine_adapters
from .tools.extract import extract_lora

#: PEFT's spellings, so PEFT code ports by changing the import
LoraConfig, LoraModel = LoRAConfig, LoRAModel

__version__ = "0.1.0"

__all__ = [
    "ALGORITHMS", "PRESETS", "AdapterConfig", "AdapterModel", "BOFTConfig", "BOFTModel", "HRAConfig", "HRAModel",
    "LoHaConfig", "LoHaModel", "LoKrConfig", "LoKrModel", "LoRAConfig", "LoRAModel", "LoraConfig", "LoraModel",
    "OFTConfig", "OFTModel", "combine_adapters", "config_from_dict", "controller_for", "enable", "extract_lora",
    "load_adapter", "save_adapter",
]
