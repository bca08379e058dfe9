"""The PEFT-style wrapper: ``pipe.unet = HRAModel(pipe.unet, HRAConfig(..), "default")``.

:class:`AdapterModel` drives the model's :class:`~lycoris_lite.core.controller.AdapterController` with
PEFT's method names; ``LoRAModel`` … ``HRAModel`` are the same class restricted to their config type,
so code written for PEFT ports by changing the import.
"""

from __future__ import annotations

import torch
from torch import nn

from ..algos.boft import BOFTConfig
from ..algos.hra import HRAConfig
from ..algos.loha import LoHaConfig
from ..algos.lokr import LoKrConfig
from ..algos.lora import LoRAConfig
from ..algos.oft import OFTConfig
from ..base.config import AdapterConfig
from ..core.controller import AdapterController, controller_for
from ..tools.arithmetic import combine_adapters


class AdapterModel(nn.Module):
    """``AdapterModel(model, config, adapter_name="default")``: ``model`` with adapters of any
    algorithm, forwarding every other attribute to it.

    Raises:
        TypeError: ``config`` is not an :class:`AdapterConfig`, or not the config class of a typed
            subclass (``LoRAModel(model, OFTConfig(...))``).
        ValueError: ``config`` targets nothing in ``model`` or does not fit a targeted layer."""

    #: the config class a typed subclass (``LoRAModel`` …) takes; ``None``: any
    config_class: type[AdapterConfig] | None = None

    def __init__(self, model: nn.Module, config: AdapterConfig, adapter_name: str = "default", *,
                 generator: torch.Generator | None = None):
        wanted = type(self).config_class
        if wanted is not None and not isinstance(config, wanted):
            raise TypeError(f"{type(self).__name__} takes a {wanted.__name__}, got {type(config).__name__}; "
                            f"use AdapterModel for any algorithm")
        super().__init__()
        self.model = model
        self.controller.add_adapter(adapter_name, config, generator=generator, activate=True)

    @property
    def controller(self) -> AdapterController:
        return controller_for(self.model)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    @property
    def peft_config(self) -> dict[str, AdapterConfig]:
        return self.controller.configs

    @property
    def active_adapters(self) -> list[str]:
        return self.controller.active_adapters

    @property
    def active_adapter(self) -> str | list[str]:
        active = self.controller.active_adapters
        return active[0] if len(active) == 1 else active

    def add_adapter(self, adapter_name: str, config: AdapterConfig, **kwargs) -> None:
        self.controller.add_adapter(adapter_name, config, **kwargs)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        self.controller.set_adapter(adapter_name)

    def set_adapters(self, adapter_names, weights=None) -> None:
        self.controller.set_adapters(adapter_names, weights)

    def set_scale(self, adapter_name: str, scale: float, layers=None) -> None:
        self.controller.set_scale(adapter_name, scale, layers)

    def disable_adapter(self):
        return self.controller.disable_adapter()

    def enable_adapter_layers(self) -> None:
        self.controller.enable_adapter_layers()

    def disable_adapter_layers(self) -> None:
        self.controller.disable_adapter_layers()

    def merge_adapter(self, adapter_names=None, safe_merge: bool = False) -> None:
        self.controller.merge_adapter(adapter_names, safe_merge)

    def unmerge_adapter(self) -> None:
        self.controller.unmerge_adapter()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None) -> nn.Module:
        return self.controller.merge_and_unload(progressbar, safe_merge, adapter_names)

    def unload(self) -> nn.Module:
        return self.controller.unload()

    def delete_adapter(self, adapter_name: str) -> None:
        self.controller.delete_adapter(adapter_name)

    def regularization_loss(self, adapter_names=None) -> torch.Tensor:
        return self.controller.regularization_loss(adapter_names)

    def add_weighted_adapter(self, adapters, weights, adapter_name: str, combination_type: str = "svd", **kwargs):
        """PEFT's ``add_weighted_adapter`` for every algorithm: :func:`~lycoris_lite.tools.arithmetic.combine_adapters`
        on this model (keyword arguments ``svd_rank``, ``density``, ``majority_sign_method``, … pass through)."""
        return combine_adapters({"model": self.model}, adapters, weights, adapter_name, combination_type, **kwargs)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        return self.controller.get_nb_trainable_parameters()

    def print_trainable_parameters(self) -> None:
        self.controller.print_trainable_parameters()


def _typed(config_class: type[AdapterConfig]) -> type[AdapterModel]:
    """The PEFT-style name of one algorithm's model: :class:`AdapterModel` that takes only ``config_class``."""
    name = config_class.__name__.removesuffix("Config") + "Model"
    return type(name, (AdapterModel,), {"config_class": config_class, "__module__": __name__,
                                        "__doc__": f"{name}(model, {config_class.__name__}(...), adapter_name)"})


LoRAModel = _typed(LoRAConfig)
LoHaModel = _typed(LoHaConfig)
LoKrModel = _typed(LoKrConfig)
OFTModel = _typed(OFTConfig)
BOFTModel = _typed(BOFTConfig)
HRAModel = _typed(HRAConfig)
