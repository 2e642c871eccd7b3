"""The form of a kronlab ``state_dict``, and what it records about the optimizer that saved it.

The form is torch.optim's: ``{"state": {parameter index: {...}}, "param_groups": [...]}``, with
nothing but parameters as keys of ``state``, so ``torch.distributed.checkpoint``
(``get_optimizer_state_dict`` / ``set_optimizer_state_dict``) can key it by parameter name. What
belongs to the whole optimizer (step counts, the signature below, the generators' states) sits in
the first param group under ``"kronlab"``; every parameter's entry also carries the step count
(``"kronlab_step"``), so each has an entry even on a rank that keeps no state for it (a sharded
optimizer keeps a bundle's state on its owning rank only), as ``set_optimizer_state_dict``
requires of every trainable parameter.

A state only means something to an optimizer of the same class, variant and parameter shapes:
loading SOAP's eigenbasis state into root-inverse Shampoo, or a ``(4, 3)`` parameter's factors
into a ``(3, 4)`` one, would run without an error and compute something else. The signature is
plain lists, strings and ints (``torch.load(weights_only=True)`` reads it back), and the check
runs before ``load_state_dict`` changes anything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kronlab.optim.base import KronOptimizer

GLOBAL_KEY = "kronlab"
STEP_KEY = "kronlab_step"
SIGNATURE_KEY = "signature"


def to_torch_form(state_dict: dict[str, Any], global_entry: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` (from ``torch.optim.Optimizer.state_dict``) in torch.optim's form with
    ``global_entry`` in the first param group and the step count added to every parameter's
    entry. The live per-parameter dicts that torch's ``state_dict`` returns are not modified."""
    state = dict(state_dict["state"])
    step = global_entry["step"]
    groups = state_dict["param_groups"]
    for group in groups:
        for index in group["params"]:
            state[index] = {**state.get(index, {}), STEP_KEY: step}
    if groups:
        groups[0][GLOBAL_KEY] = global_entry
    return {**state_dict, "state": state, "param_groups": groups}


def from_torch_form(state_dict: dict[str, Any]) -> tuple[object, dict[str, Any]]:
    """The global entry of a kronlab ``state_dict`` (``None`` if it has none) and the
    state_dict as torch.optim loads it: per-parameter state without the step counts, groups
    without the global entry. Also reads state_dicts that kept the global entry in ``state``."""
    groups = state_dict.get("param_groups", [])
    entry = groups[0].get(GLOBAL_KEY) if groups else None
    if entry is None:
        entry = state_dict.get("state", {}).get(GLOBAL_KEY)
    state = {}
    for key, value in state_dict.get("state", {}).items():
        if key == GLOBAL_KEY:
            continue
        kept = {name: item for name, item in value.items() if name != STEP_KEY}
        if kept:
            state[key] = kept
    plain_groups = [{k: v for k, v in group.items() if k != GLOBAL_KEY} for group in groups]
    return entry, {**state_dict, "state": state, "param_groups": plain_groups}


def describe_setting(value: object) -> str:
    """A param-group setting as text that is equal for equal settings across processes.

    Callables (e.g. SIRFShampoo's ``T``) have no comparable text: all of them read the same.
    """
    if callable(value) and not isinstance(value, type):
        return "<callable>"
    return repr(value)


def optimizer_signature(optimizer: KronOptimizer) -> dict[str, Any]:
    """Class, per-parameter shapes, bundles and the variant settings of every param group."""
    params = [param for group in optimizer.param_groups for param in group["params"]]
    index = {id(param): position for position, param in enumerate(params)}
    return {
        "optimizer": type(optimizer).__name__,
        "param_shapes": [list(param.shape) for param in params],
        "bundles": [[index[id(param)] for param in bundle.params] for bundle in optimizer.bundles],
        "groups": [
            {key: describe_setting(group.get(key)) for key in optimizer.variant_keys}
            for group in optimizer.param_groups
        ],
    }


def check_signature(optimizer: KronOptimizer, saved: object) -> None:
    """Raise ``ValueError`` naming the parameter or setting where ``saved`` (a signature read
    from a state_dict) does not describe ``optimizer``."""
    own = optimizer_signature(optimizer)
    if not isinstance(saved, dict) or saved.keys() != own.keys():
        raise ValueError(
            "Invalid state_dict: it has no kronlab signature (allowed: a state_dict saved by "
            f"a kronlab {own['optimizer']} with the same parameters)"
        )
    if saved["optimizer"] != own["optimizer"]:
        raise ValueError(
            f"Invalid state_dict: saved by {saved['optimizer']}, loaded into "
            f"{own['optimizer']} (allowed: a state_dict of {own['optimizer']})"
        )
    params = [param for group in optimizer.param_groups for param in group["params"]]
    if len(saved["param_shapes"]) != len(params) or len(saved["groups"]) != len(own["groups"]):
        raise ValueError(
            f"Invalid state_dict: {len(saved['param_shapes'])} parameters in "
            f"{len(saved['groups'])} param groups, loaded into {len(params)} parameters in "
            f"{len(own['groups'])} param groups"
        )
    for param, shape, saved_shape in zip(params, own["param_shapes"], saved["param_shapes"]):
        if list(saved_shape) != shape:
            raise ValueError(
                f"Invalid state_dict: parameter {optimizer.parameter_name(param)} has shape "
                f"{tuple(shape)} but the saved state is for shape {tuple(saved_shape)}"
            )
    for index, (settings, saved_settings) in enumerate(zip(own["groups"], saved["groups"])):
        for key, value in settings.items():
            if saved_settings.get(key) != value:
                raise ValueError(
                    f"Invalid state_dict: param group {index} has {key}={value} but the state "
                    f"was saved with {key}={saved_settings.get(key)}"
                )
    if saved["bundles"] != own["bundles"]:
        raise ValueError(
            f"Invalid state_dict: parameters (by index) share preconditioners as "
            f"{own['bundles']} but the state was saved for {saved['bundles']} (combine_params "
            "or the model differ)"
        )
