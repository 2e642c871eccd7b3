"""kronlab optimizers inside ``transformers.Trainer`` (``optimizers=(opt, None)``), including an
exact ``resume_from_checkpoint``: the interrupted-and-resumed run ends at the same parameters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from kronlab.optim import SOAP, Muon  # noqa: E402

STEPS = 6
CHECKPOINT_STEP = 3


class TinyClassifier(nn.Module):
    """The Trainer calls ``model(**batch)`` and reads ``loss`` from the result."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.hidden = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.head(torch.tanh(self.hidden(inputs)))
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def dataset() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(32, 6, generator=generator)
    labels = torch.randint(0, 3, (32,), generator=generator)
    return [{"inputs": x, "labels": y} for x, y in zip(inputs, labels)]


OPTIMIZERS = {
    "soap": lambda model: SOAP(model.parameters(), lr=3e-3, precondition_frequency=2),
    "muon": lambda model: Muon(None, model=model, lr=0.02, adamw_lr=3e-3),
}


class StopAt(transformers.TrainerCallback):
    """Interrupts training after ``step`` (as a crash would, but after its checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201 - HF's hook
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def train(
    name: str, output_dir: Path, *, stop_at: int | None = None, resume: str | None = None
) -> nn.Module:
    model = TinyClassifier()
    arguments = transformers.TrainingArguments(
        output_dir=str(output_dir),
        max_steps=STEPS,
        per_device_train_batch_size=8,
        save_steps=CHECKPOINT_STEP,
        save_strategy="steps",
        logging_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=model,
        args=arguments,
        train_dataset=dataset(),
        optimizers=(OPTIMIZERS[name](model), None),
        callbacks=[StopAt(stop_at)] if stop_at else None,
    )
    trainer.train(resume_from_checkpoint=resume)
    return model


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_resumed_trainer_run_equals_uninterrupted_run(name: str, tmp_path: Path) -> None:
    uninterrupted = train(name, tmp_path / "full")
    # The first run stops at the checkpoint; the second resumes there with a fresh optimizer
    # (the default linear learning-rate schedule makes the scheduler's state matter too).
    train(name, tmp_path / "resumed", stop_at=CHECKPOINT_STEP)
    checkpoint = tmp_path / "resumed" / f"checkpoint-{CHECKPOINT_STEP}"
    assert (checkpoint / "optimizer.pt").exists()
    resumed = train(name, tmp_path / "resumed", resume=str(checkpoint))
    initial = TinyClassifier()
    for (key, full), (_, again), (_, start) in zip(
        uninterrupted.state_dict().items(),
        resumed.state_dict().items(),
        initial.state_dict().items(),
    ):
        assert not torch.equal(full, start), f"{key} did not train"
        torch.testing.assert_close(again, full, rtol=0, atol=0, msg=f"{key} differs after resume")
