"""examples/lightning_lars.py (Lightning) and examples/hf_trainer_lamb.py (Hugging Face
Trainer): a few steps through each framework end with the weights (and Ghost BN running
statistics) of a plain loop over the same batches with the same optimizer and schedule,
across an epoch boundary, so the frameworks step the fastlars optimizer and the schedule
once per batch and change nothing else. Tiny synthetic data on the CPU; no downloads."""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
STEPS = 10  # batches per epoch: 8 (Lightning), 6 (Trainer)


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_same_state(trained, plain, initial):
    got, expected = trained.state_dict(), plain.state_dict()
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-7, msg=name)
    moved = [name for name, t in initial.state_dict().items() if t.is_floating_point() and not torch.equal(t, got[name])]
    assert len(moved) > len(got) // 2, moved  # the run trained: most tensors changed


@pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\)", "ignore:.*does not have many workers")
def test_lightning_lars_equals_plain_loop(tmp_path):
    L = pytest.importorskip("lightning")
    example = load("lightning_lars")
    loader = torch.utils.data.DataLoader(example.synthetic_data(8 * 32), batch_size=32)  # in order
    batches = list(loader)
    torch.manual_seed(0)
    module = example.LarsClassifier(batch_size=32, total_steps=STEPS, warmup_steps=3, virtual_batch_size=8)
    plain, initial = copy.deepcopy(module), copy.deepcopy(module)
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, loader)
    assert trainer.global_step == STEPS

    config = plain.configure_optimizers()
    optimizer, schedule = config["optimizer"], config["lr_scheduler"]["scheduler"]
    plain.train()
    for step in range(STEPS):
        x, y = batches[step % len(batches)]
        F.cross_entropy(plain(x), y).backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    assert_same_state(module, plain, initial)
    assert trainer.optimizers[0].param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


def test_hf_trainer_lamb_equals_plain_loop(tmp_path, monkeypatch):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # the Trainer needs it (transformers' "torch" extra)
    example = load("hf_trainer_lamb")
    batch, data = 16, example.SyntheticTokens(6 * 16)
    model = example.tiny_bert()
    plain, initial = copy.deepcopy(model), copy.deepcopy(model)
    args = example.training_arguments(str(tmp_path), STEPS, batch, train_sampling_strategy="sequential",
                                      disable_tqdm=True, logging_strategy="no")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   optimizers=example.lamb_and_schedule(model, STEPS, lr=1e-2, warmup_steps=3))
    trainer.train()
    assert trainer.state.global_step == STEPS

    optimizer, schedule = example.lamb_and_schedule(plain, STEPS, lr=1e-2, warmup_steps=3)
    plain.train()
    for step in range(STEPS):
        rows = slice(step % 6 * batch, (step % 6 + 1) * batch)
        plain(input_ids=data.input_ids[rows], labels=data.labels[rows]).loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    assert_same_state(model, plain, initial)
    assert trainer.optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
