"""Kronecker-factored curvature for influence functions, applied with the shared factor code.

Per tracked module the curvature is diagonal in a Kronecker eigenbasis:
``H ≈ (Q_S ⊗ Q_A) diag(vec Λ) (Q_S ⊗ Q_A)ᵀ`` and ``H⁻¹G = Q_S [(Q_Sᵀ G Q_A) / (Λ + λ)] Q_Aᵀ``.
K-FAC: ``Λ = λ_S λ_Aᵀ`` (Martens & Grosse 2015); EK-FAC: ``Λ_ij = mean_i (Q_Sᵀ G_i Q_A)_ij²``
(George et al. 2018; Grosse et al. 2023); diagonal: ``Q = I``, ``Λ = mean_i G_i²``; identity:
``Q = I``, ``Λ = 1``. Each module holds a :class:`kronlab.factors.KroneckerEigenbasis`, the
type the Shampoo family preconditions with, and damps by a :class:`kronlab.factors.Damping` rule.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kronlab.attribution.optimizer_curvature import optimizer_eigenbases
from kronlab.curvature import LayerSpec, bias_in_curvature, find_modules, layer_spec
from kronlab.factors import Damping, KroneckerEigenbasis
from kronlab.linalg.finite import all_finite
from kronlab.optim.validation import check_choice, check_range
from kronlab.summary import tensor_summary

CURVATURE_METHODS = ("kfac", "ekfac", "diagonal", "identity", "optimizer")
FORMAT_NAME = "kronlab.curvature"
FORMAT_VERSION = 1
# λ = 0.01 · mean(Λ): the factor the LDS benchmarks chose over 0.1 (Grosse et al. 2023's and
# kronfluence's rule) on digits and text, K-FAC and EK-FAC (BENCHMARKS.md, damping section).
DEFAULT_DAMPING_FACTOR = 0.01


class ModuleCurvature:
    """One module's curvature: its layer and a :class:`KroneckerEigenbasis` over ``(d_out, d_in)``.

    The keyword tensors build the eigenbasis: eigenvectors per side (``None`` = identity);
    ``output_eigenvalues`` ``(d_out,)`` / ``input_eigenvalues`` ``(d_in,)`` are the factor
    spectra (K-FAC); ``corrected_eigenvalues`` ``(d_out, d_in)``, when present, replaces their
    outer product (EK-FAC, diagonal, identity, SOAP). Or pass ``eigenbasis=`` directly.
    """

    def __init__(
        self,
        spec: LayerSpec,
        output_eigenvectors: torch.Tensor | None = None,
        input_eigenvectors: torch.Tensor | None = None,
        output_eigenvalues: torch.Tensor | None = None,
        input_eigenvalues: torch.Tensor | None = None,
        corrected_eigenvalues: torch.Tensor | None = None,
        *,
        eigenbasis: KroneckerEigenbasis | None = None,
    ) -> None:
        if eigenbasis is None:
            spectra = None
            if output_eigenvalues is not None or input_eigenvalues is not None:
                if output_eigenvalues is None or input_eigenvalues is None:
                    raise ValueError(
                        "Invalid module curvature: factor eigenvalues for one side only "
                        "(allowed: output_eigenvalues and input_eigenvalues together)"
                    )
                spectra = (output_eigenvalues, input_eigenvalues)
            eigenbasis = KroneckerEigenbasis(
                (output_eigenvectors, input_eigenvectors), spectra, corrected_eigenvalues
            )
        self.spec = spec
        self.eigenbasis = eigenbasis

    @property
    def output_eigenvectors(self) -> torch.Tensor | None:
        return self.eigenbasis.eigenvectors[0]

    @property
    def input_eigenvectors(self) -> torch.Tensor | None:
        return self.eigenbasis.eigenvectors[1]

    @property
    def output_eigenvalues(self) -> torch.Tensor | None:
        spectra = self.eigenbasis.eigenvalues
        return None if spectra is None else spectra[0]

    @property
    def input_eigenvalues(self) -> torch.Tensor | None:
        spectra = self.eigenbasis.eigenvalues
        return None if spectra is None else spectra[1]

    @property
    def corrected_eigenvalues(self) -> torch.Tensor | None:
        return self.eigenbasis.corrected

    @corrected_eigenvalues.setter
    def corrected_eigenvalues(self, corrected: torch.Tensor | None) -> None:
        # EK-FAC measures Λ in the K-FAC eigenbasis after it is fitted.
        self.eigenbasis = self.eigenbasis.with_corrected(corrected)

    def eigenvalues(self) -> torch.Tensor:
        """``Λ`` of shape ``(d_out, d_in)``."""
        return self.eigenbasis.eigenvalue_tensor()

    def tensors(self) -> dict[str, torch.Tensor]:
        names = (
            "output_eigenvectors",
            "input_eigenvectors",
            "output_eigenvalues",
            "input_eigenvalues",
            "corrected_eigenvalues",
        )
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def __repr__(self) -> str:
        return f"ModuleCurvature({self.summary()})"

    def summary(self) -> str:
        """The layer, its eigenbases and where its eigenvalues come from, in one line."""
        spec = self.spec
        bias = " with bias" if spec.has_bias else ""
        bases = " ⊗ ".join(
            "identity" if q is None else tensor_summary(q)
            for q in (self.output_eigenvectors, self.input_eigenvectors)
        )
        if self.corrected_eigenvalues is not None:
            eigenvalues = f"corrected {tensor_summary(self.corrected_eigenvalues)}"
        else:
            eigenvalues = (
                f"factor {tensor_summary(self.output_eigenvalues)} ⊗ "
                f"{tensor_summary(self.input_eigenvalues)}"
            )
        return (
            f"{spec.kind} G {spec.d_out}x{spec.d_in}{bias}; eigenbasis {bases}; "
            f"eigenvalues {eigenvalues}"
        )


@dataclass
class Curvature:
    """Inverse-curvature products for influence functions over a set of tracked modules.

    Build one with :func:`kronlab.attribution.fit_curvature`, :meth:`from_optimizer` or
    :meth:`load`. ``curvature @ grads`` is the curvature-vector product ``H G``;
    :meth:`inverse_hvp` is the damped ``(H + λI)⁻¹ G``.
    """

    method: str
    modules: dict[str, ModuleCurvature]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_choice("method", self.method, CURVATURE_METHODS)
        if not self.modules:
            raise ValueError("Invalid modules: {} (allowed: at least one tracked module)")

    def __repr__(self) -> str:
        """Method, metadata and one line per module with its default damping; no tensor values.

        The default damping ``DEFAULT_DAMPING_FACTOR · mean(Λ)`` is computed here (one
        reduction per module) because it is the number a user picks ``damping=`` against.
        """
        metadata = ", ".join(
            f"{key}={value!r}"
            for key, value in self.metadata.items()
            if isinstance(value, (str, int, float, bool)) or value is None
        )
        lines = [f"Curvature(method={self.method!r}, {len(self.modules)} modules, {metadata}"]
        for name, module in self.modules.items():
            damping = DEFAULT_DAMPING_FACTOR * float(module.eigenvalues().float().mean())
            lines.append(f"  {name!r}: {module.summary()}; default damping {damping:.3g}")
        return "\n".join(lines) + "\n)"

    # -- products ---------------------------------------------------------------------------

    def damping(
        self, name: str, damping: float | None = None, damping_factor: float | None = None
    ) -> float:
        """Absolute ``damping`` if given, else ``damping_factor · mean(Λ)`` (default
        :data:`DEFAULT_DAMPING_FACTOR`)."""
        rule = damping_rule(damping, damping_factor)
        return float(rule.shift(self._module(name).eigenvalues(), 2))

    def inverse_hvp(
        self,
        grads: Mapping[str, torch.Tensor],
        damping: float | None = None,
        *,
        damping_factor: float | None = None,
    ) -> dict[str, torch.Tensor]:
        """``(H + λI)⁻¹ G`` per module for gradients ``(d_out, d_in)`` or stacks ``(n, …)``.

        ``damping`` is an absolute ``λ``; without it ``λ = damping_factor · mean(Λ)`` per
        module (default factor 0.1, as in Grosse et al. 2023). Raises ``ValueError`` instead of
        returning inf or NaN: for a non-finite gradient, for ``Λ + λ`` not finite and positive
        everywhere (``damping=0`` on a curvature with zero eigenvalues), or for a product that
        overflows.
        """
        rule = damping_rule(damping, damping_factor)
        result = {}
        for name, grad in grads.items():
            if not all_finite([grad]):
                raise ValueError(f"Invalid grads[{name!r}]: it has NaN or infinite entries")
            module = self._module(name)
            denominator = module.eigenbasis.damped_eigenvalues(rule)
            smallest = float(denominator.min())
            if not (math.isfinite(smallest) and smallest > 0 and all_finite([denominator])):
                damping_value = self.damping(name, damping, damping_factor)
                raise ValueError(
                    f"Invalid damping for module {name!r}: λ = {damping_value!r} (damping="
                    f"{damping!r}, damping_factor={damping_factor!r}) leaves eigenvalues + λ "
                    f"with minimum {smallest!r}; (H + λI)⁻¹ needs every eigenvalue + λ finite "
                    "and > 0 (allowed: damping > 0, or a damping_factor > 0 with a curvature "
                    "whose mean eigenvalue is > 0)"
                )
            product = self._apply(module, grad, denominator.reciprocal())
            if not all_finite([product]):
                damping_value = self.damping(name, damping, damping_factor)
                raise ValueError(
                    f"(H + λI)⁻¹ G overflowed for module {name!r} (λ = {damping_value!r}): "
                    "increase the damping or rescale the gradients"
                )
            result[name] = product
        return result

    def __matmul__(self, grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``H G`` per module (no damping)."""
        return {
            name: self._apply(self._module(name), grad, self._module(name).eigenvalues())
            for name, grad in grads.items()
        }

    def _apply(
        self, module: ModuleCurvature, grad: torch.Tensor, scaling: torch.Tensor
    ) -> torch.Tensor:
        spec = module.spec
        if grad.shape[-2:] != (spec.d_out, spec.d_in):
            raise ValueError(
                f"Invalid gradient shape: {tuple(grad.shape)} (allowed: (..., {spec.d_out}, "
                f"{spec.d_in}) for this {spec.kind} module)"
            )
        dtype = torch.promote_types(grad.dtype, scaling.dtype)
        basis = module.eigenbasis.to(device=grad.device, dtype=dtype)
        product = basis.apply(grad.to(dtype), scaling.to(device=grad.device, dtype=dtype))
        return product.to(grad.dtype)

    def _module(self, name: str) -> ModuleCurvature:
        if name not in self.modules:
            raise ValueError(
                f"Invalid module name: {name!r} has no curvature (fitted: "
                f"{', '.join(self.modules)})"
            )
        return self.modules[name]

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Curvature:
        """A copy with every tensor on ``device`` / in ``dtype`` (so products need no moves)."""
        modules = {
            name: ModuleCurvature(module.spec, eigenbasis=module.eigenbasis.to(device, dtype))
            for name, module in self.modules.items()
        }
        return Curvature(self.method, modules, dict(self.metadata))

    # -- model checks -----------------------------------------------------------------------

    @property
    def includes_bias(self) -> bool:
        """Whether the tracked layers' biases were fitted (``fit_curvature(bias=...)``)."""
        return bool(self.metadata.get("bias", True))

    def tracked_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        """The model's modules this curvature was fitted on; ``ValueError`` on any mismatch."""
        found = dict(model.named_modules())
        missing = [name for name in self.modules if name not in found]
        if missing:
            raise ValueError(f"curvature and model mismatch: model has no module {missing}")
        modules = {}
        for name, curvature in self.modules.items():
            with bias_in_curvature(self.includes_bias):
                spec = layer_spec(found[name])
            if spec != curvature.spec:
                raise ValueError(
                    f"curvature and model mismatch at {name!r}: fitted on {curvature.spec}, "
                    f"model has {spec}"
                )
            modules[name] = found[name]
        return modules

    # -- persistence ------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write a safetensors file: the tensors plus versioned JSON metadata."""
        save_file = _safetensors().save_file
        tensors = {
            f"{name}::{kind}": tensor.detach().contiguous().cpu()
            for name, module in self.modules.items()
            for kind, tensor in module.tensors().items()
        }
        header = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "method": self.method,
            "modules": {name: module.spec.as_dict() for name, module in self.modules.items()},
            "metadata": self.metadata,
        }
        save_file(tensors, str(path), metadata={FORMAT_NAME: json.dumps(header)})

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> Curvature:
        """Read a file written by :meth:`save` (``ValueError`` on another format or version)."""
        safe_open = _safetensors().safe_open
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as handle:
                raw = (handle.metadata() or {}).get(FORMAT_NAME)
                if raw is None:
                    raise ValueError(
                        f"Invalid curvature file: {path} has no {FORMAT_NAME} metadata"
                    )
                header = json.loads(raw)
                if header.get("version") != FORMAT_VERSION:
                    raise ValueError(
                        f"Invalid curvature file version: {header.get('version')!r} "
                        f"(allowed: {FORMAT_VERSION})"
                    )
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        except (OSError, ValueError):
            raise
        except Exception as error:  # safetensors' own error type for a damaged file
            raise ValueError(f"Invalid curvature file: {path} cannot be read ({error})") from None
        damaged = [key for key, tensor in tensors.items() if not all_finite([tensor])]
        if damaged:
            raise ValueError(f"Invalid curvature file: {path} has non-finite values in {damaged}")
        modules = {}
        for name, spec in header["modules"].items():
            parts = {
                key.split("::", 1)[1]: tensor
                for key, tensor in tensors.items()
                if key.split("::", 1)[0] == name
            }
            modules[name] = ModuleCurvature(LayerSpec(**spec), **parts)
        return cls(header["method"], modules, header.get("metadata", {}))

    # -- optimizer curvature ----------------------------------------------------------------

    @classmethod
    def from_optimizer(
        cls, optimizer: Any, model: nn.Module, modules: str | list[str] | None = None
    ) -> Curvature:
        """Curvature from a trained Shampoo/SOAP optimizer's own Kronecker factors: a
        conversion of its eigenbases, see :mod:`kronlab.attribution.optimizer_curvature`."""
        tracked = find_modules(model, modules)
        eigenbases = optimizer_eigenbases(optimizer, tracked)
        fitted = {
            name: ModuleCurvature(layer_spec(tracked[name]), eigenbasis=eigenbasis)
            for name, eigenbasis in eigenbases.items()
        }
        return cls("optimizer", fitted, {"optimizer": type(optimizer).__name__})


def damping_rule(damping: float | None = None, damping_factor: float | None = None) -> Damping:
    """The rule of ``inverse_hvp``'s arguments: absolute ``damping`` if given, else
    ``damping_factor · mean(Λ)`` (default :data:`DEFAULT_DAMPING_FACTOR`)."""
    if damping is not None:
        check_range("damping", damping, 0.0)
        return Damping("absolute", float(damping))
    factor = DEFAULT_DAMPING_FACTOR if damping_factor is None else damping_factor
    check_range("damping_factor", factor, 0.0)
    return Damping("relative_to_mean", float(factor))


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "saving and loading a Curvature needs safetensors: pip install 'kronlab[hf]' "
            "(or pip install safetensors)"
        ) from error
    return safetensors.torch
