"""Forward hooks that record tracked modules' inputs and outputs, then their output gradients.

One forward + one ``torch.autograd.grad`` with respect to the recorded *outputs* gives, per
tracked module call, the activations ``a_t`` and output gradients ``g_t = ∂loss/∂s_t`` per token,
without touching any parameter's ``.grad`` and without forming a per-example model gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any
from weakref import WeakSet

import torch
from torch import nn

from kronlab.curvature.attention import sequence_first_modules
from kronlab.curvature.layers.base import LayerSpec, registered_adapters
from kronlab.curvature.layers.registry import layer_adapter, layer_spec

LossFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclass
class LayerBatch:
    """One call of a tracked module on a batch of ``n`` examples with ``T`` tokens each.

    ``inputs``: ``(n, T, d_in)`` without the bias column and *not* masked (embeddings: token
    indices ``(n, T)``); ``gradients``: ``(n, T, d_out)``, zero on masked tokens, which is
    enough for ``G_i = Σ_t g_t a_tᵀ`` to ignore them. ``token_mask`` ``(n, T)`` bool or
    ``None`` (all tokens count). :attr:`activations` is the K-FAC ``a_t`` (bias 1 appended,
    masked tokens zero), built only when asked for: per-example gradients fold the bias into the
    projection instead and never pay for the copy.
    """

    name: str
    spec: LayerSpec
    inputs: torch.Tensor
    gradients: torch.Tensor
    token_mask: torch.Tensor | None

    @property
    def num_examples(self) -> int:
        return self.gradients.shape[0]

    @property
    def num_tokens(self) -> int:
        if self.token_mask is None:
            return self.gradients.shape[0] * self.gradients.shape[1]
        return int(self.token_mask.sum())

    @cached_property
    def activations(self) -> torch.Tensor:
        """``(n, T, d_in [+1])`` with the bias 1 appended and masked tokens zeroed (embeddings:
        the token indices)."""
        return self.spec.adapter.activations(self)


@dataclass
class _Call:
    name: str
    module: nn.Module
    inputs: torch.Tensor
    output: torch.Tensor
    versions: tuple[int, int]  # of inputs and output when recorded

    def modified_in_place(self) -> bool:
        """Whether a later in-place op (``ReLU(inplace=True)``, ``x += …``) changed a tensor
        recorded here: the recorded activations, or the gradient with respect to the output,
        would then belong to the modified values, not to this module's."""
        return (self.inputs._version, self.output._version) != self.versions


# Modules whose input or output a later in-place op was seen to modify: their calls are
# recorded through copies from then on (a module-level set, so every pass, batch and stage
# after the first detection pays one copy instead of a second forward).
_RECORD_THROUGH_COPIES: WeakSet[nn.Module] = WeakSet()


class _Recorder:
    """Context manager: record ``(module, input, output)`` of every tracked module call.

    For a module in ``_RECORD_THROUGH_COPIES`` the recorded input is a copy and the module's
    output is replaced by a copy for the rest of the forward, so in-place ops downstream edit
    the copy while the recorded output stays the one whose gradient is wanted.
    """

    def __init__(
        self,
        modules: dict[str, nn.Module],
        batch_size: int | None = None,
        model: nn.Module | None = None,
    ) -> None:
        self.modules = modules
        self.batch_size = batch_size
        self.model = model
        self.calls: list[_Call] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._undo: list[Callable[[], None]] = []
        self._sequence_first: set[int] = set()

    def __enter__(self) -> _Recorder:
        for name, module in self.modules.items():
            if not layer_adapter(module).hooked:
                continue  # recorded from inside another forward (rerouted below)
            self._handles.append(
                module.register_forward_hook(self._hook_for(name), with_kwargs=True)
            )
        # Layers applied inside a fused call (attention's projections) are made visible by
        # their adapters, which run the modules around them through a forward that shows them.
        searched = self.model if self.model is not None else nn.ModuleList(self.modules.values())
        self._undo = [
            undo
            for adapter in registered_adapters()
            for undo in adapter.reroute(searched, self.modules, self._record_for)
        ]
        self._sequence_first = sequence_first_modules(searched)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for undo in self._undo:
            undo()
        self._undo.clear()

    def _record_for(self, name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        hook, module = self._hook_for(name), self.modules[name]

        def record(inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
            replaced = hook(module, (inputs,), {}, output)
            return output if replaced is None else replaced

        return record

    def _hook_for(self, name: str) -> Callable[..., None]:
        def hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
        ) -> torch.Tensor | None:
            if not isinstance(output, torch.Tensor):
                raise ValueError(f"module {name!r} returned {type(output).__name__}, not a tensor")
            inputs = args[0] if args else next(iter(kwargs.values()), None)
            if not isinstance(inputs, torch.Tensor):
                raise ValueError(f"module {name!r} was called without an input tensor")
            copy = module in _RECORD_THROUGH_COPIES
            inputs = inputs.detach().clone() if copy else inputs.detach()
            # Inside a sequence-first transformer layer a module sees (tokens, examples, ·):
            # record example-first views and hand their transpose on, so the recorded output
            # is the one downstream uses.
            sequence_first = id(module) in self._sequence_first and inputs.ndim == output.ndim == 3
            if sequence_first:
                inputs, output = inputs.transpose(0, 1), output.transpose(0, 1)
            n = self.batch_size
            broadcast = n is not None and n > 1 and inputs.shape[:1] == output.shape[:1] == (1,)
            if broadcast:
                # One call for the whole batch whose output is broadcast over it (HF GPT-2's
                # position embedding gets position ids (1, T)): autograd would hand back the
                # batch's summed gradient. An expanded output (a view, same values downstream)
                # gets each example's own gradient instead; the inputs are the same per example.
                inputs = inputs.expand(n, *inputs.shape[1:])
                output = output.expand(n, *output.shape[1:])
            elif n is not None and (inputs.ndim == 0 or inputs.shape[0] != n):
                raise ValueError(_not_example_first(name, inputs, n))
            self.calls.append(
                _Call(name, module, inputs, output, (inputs._version, output._version))
            )
            forward_output = output.transpose(0, 1) if sequence_first else output
            if copy:
                return forward_output.clone()
            return forward_output if broadcast or sequence_first else None

        return hook


def _not_example_first(name: str, inputs: torch.Tensor, n: int) -> str:
    return (
        f"Invalid model for per-example gradients: tracked module {name!r} got an input of shape "
        f"{tuple(inputs.shape)}, whose first dim is not the batch's {n} examples (allowed: "
        "(examples, ...) inputs; a (tokens, examples, ...) layout or a reshape that merges "
        "examples and tokens would mix examples' gradients). Feed the module example-first "
        "(e.g. batch_first=True) or leave it out with modules="
    )


def layer_batches(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn,
    modules: dict[str, nn.Module],
    mask: torch.Tensor | None = None,
) -> Iterator[LayerBatch]:
    """Run ``loss_fn(model, batch)`` and yield a :class:`LayerBatch` per tracked module call.

    ``loss_fn`` must return a scalar that is the *sum* of the per-example losses, so that the
    output gradients of example ``i`` are those of its own loss (no ``1/n`` factor).
    ``mask`` ``(n, T)`` marks real (1) and padding (0) tokens; padding contributes nothing.
    """
    if not modules:
        raise ValueError("Invalid modules: {} (allowed: at least one tracked module)")
    specs = {name: layer_spec(module) for name, module in modules.items()}
    for name, spec in specs.items():
        if spec is None:
            raise ValueError(f"Invalid modules: {name!r} is not a trackable module")
    with _Recorder(modules, _batch_size(batch, mask), model) as recorder:
        loss = _call_loss_fn(loss_fn, model, batch)
    _check_loss(loss)
    modified = [call for call in recorder.calls if call.modified_in_place()]
    if modified:
        if any(call.module in _RECORD_THROUGH_COPIES for call in modified):
            raise RuntimeError(
                "tracked modules' recorded tensors changed in place even through copies: "
                f"{sorted({call.name for call in modified})}"
            )
        # Once per module: remember it and run this batch again, recording through copies.
        _RECORD_THROUGH_COPIES.update(call.module for call in modified)
        del loss, recorder
        yield from layer_batches(model, batch, loss_fn, modules, mask)
        return
    uncalled = sorted(set(modules) - {call.name for call in recorder.calls})
    if uncalled:
        raise ValueError(f"tracked modules were not called by loss_fn: {', '.join(uncalled)}")
    not_differentiable = [call.name for call in recorder.calls if not call.output.requires_grad]
    if not_differentiable:
        raise ValueError(
            "tracked modules received no gradient (output does not require grad; frozen "
            f"parameters?): {', '.join(sorted(set(not_differentiable)))}"
        )
    # Gradients with respect to the outputs only: the engine runs just the nodes on paths to
    # them, and each node forms only the input gradients those paths need, so no parameter
    # gradient (weight matmul, LayerNorm, tied embedding) is computed. Freezing the parameters
    # for the pass was measured as no gain (1.00x build time, same saved tensors).
    output_gradients = torch.autograd.grad(
        loss, [call.output for call in recorder.calls], allow_unused=True
    )
    missing = sorted({c.name for c, g in zip(recorder.calls, output_gradients) if g is None})
    if missing:
        raise ValueError(
            f"tracked modules received no gradient from the loss: {missing}" + _compiled_hint(model)
        )
    for call, output_gradient in zip(recorder.calls, output_gradients):
        spec = specs[call.name]
        assert spec is not None
        adapter = spec.adapter
        inputs = adapter.token_inputs(call.module, call.inputs)
        gradients = adapter.token_gradients(
            call.module, output_gradient.detach(), inputs.shape[0], spec.d_out
        )
        yield _apply_mask(call, spec, inputs, gradients, mask)


def _batch_size(batch: Any, mask: torch.Tensor | None) -> int | None:
    """Examples in ``batch``: the mask's rows, else the leading size of its first tensor (a
    tensor, or the first one in a tuple, list or dict); ``None`` if it holds no tensor."""
    if mask is not None:
        return mask.shape[0]
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (tuple, list)):
        batch = next((item for item in batch if isinstance(item, torch.Tensor)), None)
    if isinstance(batch, torch.Tensor) and batch.ndim > 0:
        return batch.shape[0]
    return None


def _compiled_hint(model: nn.Module) -> str:
    """Why a compiled model's tracked outputs get no gradient, if it is compiled."""
    compiled = type(model).__name__ == "OptimizedModule" or any(
        getattr(module, "_compiled_call_impl", None) is not None for module in model.modules()
    )
    if not compiled:
        return ""
    return (
        ". The model is torch.compile'd: the compiled graph's backward is one autograd node, so "
        "the outputs the hooks record are side outputs with no path to the loss. Run the "
        "attribution passes on the eager model (for a faster pass on CPU, "
        "fused_activations=True / --fused-activations swaps unfused activations instead)"
    )


def _call_loss_fn(loss_fn: LossFn, model: nn.Module, batch: Any) -> object:
    """``loss_fn(model, batch)``, a ``TypeError`` there restated with the expected signature.

    A plain loss such as ``F.cross_entropy(logits, targets)`` passed by mistake fails inside
    torch with a message about its own arguments; say what kronlab calls instead.
    """
    try:
        return loss_fn(model, batch)
    except TypeError as error:
        name = getattr(loss_fn, "__qualname__", type(loss_fn).__name__)
        raise TypeError(
            f"Invalid loss_fn: calling {name}(model, batch) raised TypeError: {error} "
            "(expected loss_fn(model: nn.Module, batch) -> scalar tensor, the summed loss of "
            "the batch, e.g. lambda model, batch: F.cross_entropy(model(batch[0]), batch[1], "
            "reduction='sum'))"
        ) from error


def _check_loss(loss: object) -> None:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(
            f"Invalid loss_fn result: {type(loss).__name__} "
            f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''} "
            "(allowed: a scalar tensor, the sum of per-example losses)"
        )
    if not loss.requires_grad:
        raise ValueError("Invalid loss_fn result: the loss does not require grad")


def _apply_mask(
    call: _Call,
    spec: LayerSpec,
    inputs: torch.Tensor,
    gradients: torch.Tensor,
    mask: torch.Tensor | None,
) -> LayerBatch:
    token_mask = None
    if mask is not None:
        if mask.shape != inputs.shape[:2]:
            raise ValueError(
                f"Invalid mask shape: {tuple(mask.shape)} for module {call.name!r} (allowed: "
                f"(examples, tokens) = {tuple(inputs.shape[:2])})"
            )
        token_mask = mask.to(device=gradients.device).bool()
    token_mask = spec.adapter.token_mask(call.module, inputs, token_mask)
    if token_mask is not None:
        # Zero output gradients suffice: every product with g_t vanishes on masked tokens.
        gradients = gradients * token_mask.to(gradients.dtype).unsqueeze(-1)
    return LayerBatch(call.name, spec, inputs, gradients, token_mask)
