"""Optimizer state across every registered kronlab optimizer: refused inputs leave it untouched,
param groups added later are stepped, checkpoints load only into a matching optimizer, and the
random stream is the optimizer's own."""

import pytest
import torch
from torch import nn

from kronlab.groups import LinearWeightBias, PerParameter
from kronlab.optim import (
    PSGD,
    SOAP,
    KLShampoo,
    Muon,
    Shampoo,
    SIRFShampoo,
    Spectron,
    create_optimizer,
)

from .state_checks import (
    KRON_OPTIMIZERS,
    assert_identical,
    cloned,
    same_parameters,
    through_torch_save,
)


def snapshot(optimizer: torch.optim.Optimizer) -> dict:
    return cloned(optimizer.state_dict())


class EmbeddingModel(nn.Module):
    def __init__(self, sparse: bool = False) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 4, sparse=sparse)
        self.hidden = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(self.embedding(tokens))))


@pytest.mark.parametrize("name", KRON_OPTIMIZERS)
def test_sparse_gradient_is_refused_before_any_state_moves(name):
    model = EmbeddingModel()
    optimizer = create_optimizer(name, model)
    model(torch.tensor([1, 2, 3])).square().mean().backward()
    optimizer.step()
    before = snapshot(optimizer)
    params = [p.detach().clone() for p in model.parameters()]
    optimizer.zero_grad()
    model(torch.tensor([4, 5])).square().mean().backward()
    model.embedding.weight.grad = model.embedding.weight.grad.to_sparse()
    with pytest.raises(TypeError, match=r"Invalid gradient of .*layout torch.sparse_coo"):
        optimizer.step()
    assert_identical(before, optimizer.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))


def test_frozen_parameter_is_named_as_frozen_not_as_a_missing_rule():
    model = EmbeddingModel()
    model.hidden.bias.requires_grad_(False)
    with pytest.raises(ValueError, match=r"\['hidden.bias'\] do not require grad") as error:
        SIRFShampoo(model, params=list(model.parameters()))
    assert "fallback" not in str(error.value)
    rules = (LinearWeightBias(), PerParameter())
    with pytest.raises(ValueError, match="do not require grad"):
        SIRFShampoo(model, params=list(model.parameters()), combine_params=rules)
    SIRFShampoo(model, combine_params=rules)  # params=None takes the trainable ones


def test_parameter_outside_the_model_is_named_as_such_or_gets_its_own_preconditioner():
    model = EmbeddingModel()
    stray = nn.Parameter(torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"\['group0.param0'\] are not parameters of model="):
        SIRFShampoo(model, params=[stray], combine_params=LinearWeightBias())
    optimizer = SIRFShampoo(model, params=[stray])  # PerParameter needs no model
    assert [bundle.params for bundle in optimizer.bundles] == [(stray,)]


class TwoPart(nn.Module):
    """A small network whose two parts can be given to an optimizer one after the other."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3), nn.Tanh())
        self.second = nn.Linear(3, 2)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(inputs))


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int) -> None:
    """Steps on a fixed regression batch sequence (its own generator: the global RNG is free)."""
    generator = torch.Generator().manual_seed(seed)
    width = next(model.parameters()).shape[-1]
    for _ in range(steps):
        inputs = torch.randn(8, width, generator=generator)
        optimizer.zero_grad()
        model(inputs).square().mean().backward()
        optimizer.step()


def saved_and_loaded(optimizer: torch.optim.Optimizer) -> dict:
    return through_torch_save(optimizer.state_dict())


def test_shampoo_checkpoint_with_a_later_group_loads_into_one_built_with_both():
    model = TwoPart()
    optimizer = Shampoo(model.first.parameters(), precondition_frequency=2)
    train(model, optimizer, 2, seed=1)
    optimizer.add_param_group({"params": list(model.second.parameters()), "lr": 3e-3})
    train(model, optimizer, 2, seed=2)
    resumed_model = TwoPart()
    resumed_model.load_state_dict(model.state_dict())
    resumed = Shampoo(
        [
            {"params": list(resumed_model.first.parameters())},
            {"params": list(resumed_model.second.parameters()), "lr": 3e-3},
        ],
        precondition_frequency=2,
    )
    resumed.load_state_dict(saved_and_loaded(optimizer))
    train(model, optimizer, 3, seed=3)
    train(resumed_model, resumed, 3, seed=3)
    assert same_parameters(model, resumed_model)


class Matrix(nn.Module):
    """One weight of a given shape: ``inputs @ weightᵀ`` (as ``nn.Linear``)."""

    def __init__(self, rows: int, columns: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.weight = nn.Parameter(torch.randn(rows, columns))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs @ self.weight.T


def trained(name: str, model: nn.Module, steps: int = 2) -> torch.optim.Optimizer:
    optimizer = create_optimizer(name, model)
    train(model, optimizer, steps, seed=1)
    return optimizer


@pytest.mark.parametrize(
    "source, target, message",
    [
        (
            lambda m: Shampoo(m.parameters()),
            lambda m: Shampoo(m.parameters(), preconditioner="eigenvalue_corrected"),
            r"param group 0 has preconditioner=EigenvalueCorrectedConfig.* but the state was "
            r"saved with preconditioner=RootInverseConfig",
        ),
        (
            lambda m: Shampoo(m.parameters()),
            lambda m: SOAP(m.parameters()),
            "saved by Shampoo, loaded into SOAP",
        ),
        (
            lambda m: SOAP(m.parameters()),
            lambda m: KLShampoo(m.parameters()),
            "saved by SOAP, loaded into KLShampoo",
        ),
        (
            lambda m: Shampoo(m.parameters()),
            lambda m: Shampoo(m.parameters(), kl=True),
            "param group 0 has kl=True but the state was saved with kl=False",
        ),
        (
            lambda m: PSGD(m.parameters(), method="quad"),
            lambda m: PSGD(m.parameters(), method="procrustes"),
            "has method='procrustes' but the state was saved with method='quad'",
        ),
        (lambda m: Muon(model=m), lambda m: Spectron(model=m, rank=1), "saved by Muon"),
        (
            lambda m: SIRFShampoo(m),
            lambda m: SIRFShampoo(m, structures="diagonal"),
            "has structures='diagonal' but the state was saved with structures='dense'",
        ),
    ],
)
def test_state_of_another_configuration_is_refused_and_nothing_changes(source, target, message):
    model = Matrix(4, 3)
    saving = source(model)
    train(model, saving, 2, seed=1)
    loading = target(model)
    train(model, loading, 1, seed=2)
    before = snapshot(loading)
    with pytest.raises(ValueError, match=message):
        loading.load_state_dict(saved_and_loaded(saving))
    assert_identical(before, loading.state_dict())


@pytest.mark.parametrize("name", KRON_OPTIMIZERS)
def test_state_of_a_transposed_parameter_is_refused_naming_it(name):
    saving = trained(name, Matrix(4, 3))
    model = Matrix(3, 4)
    loading = trained(name, model, steps=1)
    before = snapshot(loading)
    with pytest.raises(
        ValueError,
        match=r"parameter .* has shape \(3, 4\) but the saved state is "
        r"for shape \(4, 3\)",
    ):
        loading.load_state_dict(saved_and_loaded(saving))
    assert_identical(before, loading.state_dict())


def test_state_dict_without_a_signature_is_refused():
    model = Matrix(4, 3)
    optimizer = trained("shampoo", model)
    saved = optimizer.state_dict()
    del saved["param_groups"][0]["kronlab"]["signature"]
    with pytest.raises(ValueError, match="no kronlab signature"):
        create_optimizer("shampoo", model).load_state_dict(saved)
    adam = torch.optim.Adam(model.parameters())
    train(model, adam, 1, seed=1)
    with pytest.raises(ValueError, match="no 'kronlab' entry"):
        create_optimizer("shampoo", model).load_state_dict(adam.state_dict())


def noisy_psgd(model: nn.Module, seed: int | None = None) -> PSGD:
    """PSGD with fit noise large enough to change every step's result."""
    return PSGD(model.parameters(), lr=0.01, noise_scale=0.1, dtype=torch.float32, seed=seed)


RANDOM_OPTIMIZERS = {
    "psgd": noisy_psgd,
    "spectron": lambda model, seed=None: Spectron(model=model, rank=2, seed=seed),
}


@pytest.mark.parametrize("build", RANDOM_OPTIMIZERS.values(), ids=RANDOM_OPTIMIZERS.keys())
def test_steps_leave_the_global_random_stream_alone(build):
    model = TwoPart()
    optimizer = build(model)
    state = torch.get_rng_state()
    train(model, optimizer, 3, seed=1)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("build", RANDOM_OPTIMIZERS.values(), ids=RANDOM_OPTIMIZERS.keys())
def test_resume_is_exact_without_restoring_the_global_random_stream(build):
    model = TwoPart()
    optimizer = build(model)
    train(model, optimizer, 2, seed=1)
    checkpoint = saved_and_loaded(optimizer)
    resumed_model = TwoPart()
    resumed_model.load_state_dict(model.state_dict())
    torch.manual_seed(123)  # a different global seed at construction and during the steps
    resumed = build(resumed_model)
    resumed.load_state_dict(checkpoint)
    train(model, optimizer, 3, seed=2)
    train(resumed_model, resumed, 3, seed=2)
    assert same_parameters(model, resumed_model)


def test_seed_picks_the_noise_and_defaults_follow_the_global_seed():
    def run(seed=None, global_seed=0):
        model = TwoPart()
        torch.manual_seed(global_seed)
        train(model, noisy_psgd(model, seed), 3, seed=1)
        return [p.detach().clone() for p in model.parameters()]

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a, b))

    assert same(run(seed=5), run(seed=5, global_seed=9))
    assert not same(run(seed=5), run(seed=6))
    assert same(run(), run())
    assert not same(run(global_seed=0), run(global_seed=1))
    with pytest.raises(ValueError, match="Invalid seed: 1.0"):
        PSGD(TwoPart().parameters(), seed=1.0)


def test_schedules_and_hyperparameters_may_change_between_runs():
    """Only what changes the meaning of the state is checked: SIRFShampoo's ``T`` (kept from
    construction) and the saved hyperparameters (restored, as torch.optim does) may differ."""
    model = Matrix(4, 3)
    saving = SIRFShampoo(model, T=1, lr=0.01)
    train(model, saving, 2, seed=1)
    loading = SIRFShampoo(model, T=lambda step: step % 3 == 0, lr=0.5)
    loading.load_state_dict(saved_and_loaded(saving))
    assert loading.param_groups[0]["lr"] == 0.01 and callable(loading.param_groups[0]["T"])
