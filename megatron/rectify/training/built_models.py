"""The one registry of the training entry point: the model chunks this process built.

megatron's ``pretrain`` builds the model inside itself and returns nothing, so what runs
after training (the routing summary, the replica check of the tests) and observers that need
the model before its first forward (the quality benchmark's gate control) learn about it here.
:func:`~megatron.rectify.training.gpt_recipe.model_provider` registers every chunk it builds;
nothing else writes to it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

#: ``callback(model_chunk)``; see :func:`add_model_built_callback`.
ModelBuiltCallback = Callable[[torch.nn.Module], None]


class BuiltModels:
    """The model chunks built in this process (in build order), and who is told of each."""

    def __init__(self) -> None:
        self.chunks: list[torch.nn.Module] = []
        self._callbacks: list[ModelBuiltCallback] = []

    def register(self, model: torch.nn.Module) -> None:
        """Record ``model`` (a freshly built, unwrapped chunk) and call every callback on it."""
        self.chunks.append(model)
        for callback in tuple(self._callbacks):
            callback(model)

    def add_callback(self, callback: ModelBuiltCallback) -> Callable[[], None]:
        """Call ``callback(model)`` with every chunk built from now on; returns a function that
        removes it."""
        self._callbacks.append(callback)

        def remove() -> None:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

        return remove

    def moe_layers(self) -> list[torch.nn.Module]:
        """The ``RectifyMoELayer`` modules of the built chunks, by layer number."""
        from megatron.rectify.moe_layer import RectifyMoELayer

        layers = [m for chunk in self.chunks for m in chunk.modules()]
        layers = [m for m in layers if isinstance(m, RectifyMoELayer)]
        return sorted(layers, key=lambda layer: model_layer_number(layer) or 0)


def model_layer_number(layer: torch.nn.Module) -> int | None:
    """``layer``'s 1-based number in the whole model, multi-token-prediction layers after the
    decoder's: megatron numbers the layers inside an MTP block from 1 again, and its MoE
    metrics tracker files MTP layer ``n`` under ``num_layers + n`` (as ``RectifyMoELayer`` does
    for the routing statistics)."""
    number = getattr(layer, "layer_number", None)
    if number is None or not getattr(layer, "is_mtp_layer", False):
        return number
    return number + layer.config.num_layers


#: This process's registry (megatron keeps one model per process, so does this).
BUILT_MODELS = BuiltModels()


def add_model_built_callback(callback: ModelBuiltCallback) -> Callable[[], None]:
    """Call ``callback(model_chunk)`` with every model chunk the training entry point builds,
    before the chunk runs its first forward (e.g. to switch a router control on); returns a
    function that removes the callback. Register it before ``main`` builds the model."""
    return BUILT_MODELS.add_callback(callback)
