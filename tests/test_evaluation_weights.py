"""Every evaluation works on exactly the weights it is given.

An audit found that linear-eval, fine-tune and transfer could evaluate a fresh encoder
instead of the pretrained one and every test still passed (accuracies were only checked to
lie in [0, 1]). These tests record what the evaluations compute with and compare it against
the checkpoint's weights loaded by hand with ``torch.load``, independently of
``load_pretrained``.
"""

from __future__ import annotations

import torch

from simclr_core import evaluate
from simclr_core.config import FinetuneConfig, LinearEvalConfig, TransferConfig
from simclr_core.data import PreparedDataset
from simclr_core.method.augment import batched_test_transform
from simclr_core.method.models import build_encoder

CPU = torch.device("cpu")


def _encoder_by_hand(model_file) -> tuple[torch.nn.Module, dict]:
    """The encoder of ``model_file`` built from its config and loaded with torch.load."""
    state = torch.load(model_file, map_location="cpu", weights_only=True)
    config = state["model_config"]
    encoder = build_encoder(config["arch"], cifar_stem=config["cifar_stem"], width_multiplier=config["width_multiplier"])
    weights = {key.removeprefix("encoder."): value for key, value in state["model"].items() if key.startswith("encoder.")}
    encoder.load_state_dict(weights)
    return encoder.eval(), state


def _recorded(monkeypatch, name: str) -> list:
    """Calls of ``<name>`` from any module of ``simclr_core.evaluate``, recorded in order as
    (args, result) while they run as usual."""
    calls: list = []
    modules = [module for module in (evaluate.common, evaluate.linear, evaluate.semi_supervised, evaluate.transfer_learning)
               if hasattr(module, name)]
    real = getattr(modules[0], name)

    def recording(*args, **kwargs):
        if name == "train_classifier":  # its weights before training changes them
            calls.append({key: value.clone() for key, value in args[0].encoder.state_dict().items()})
            return real(*args, **kwargs)
        result = real(*args, **kwargs)
        calls.append((args, result))
        return result

    for module in modules:
        monkeypatch.setattr(module, name, recording)
    return calls


def test_linear_eval_features_are_those_of_the_given_weights(tiny_pretrained, tiny_prepared, monkeypatch):
    calls = _recorded(monkeypatch, "extract")
    evaluate.linear_eval(tiny_pretrained / "model.pt", tiny_prepared, LinearEvalConfig(l2_grid=[1e-3], max_iter=5, augment_copies=0), CPU)
    encoder, state = _encoder_by_hand(tiny_pretrained / "model.pt")
    size = state["model_config"]["image_size"]
    train = PreparedDataset(tiny_prepared).images("train")
    with torch.no_grad():
        expected = encoder(batched_test_transform(torch.from_numpy(train.copy()), size))
    pretrained_train, random_train = calls[0][1], calls[3][1]  # train, val, test for each encoder
    torch.testing.assert_close(pretrained_train, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(random_train, expected, atol=1e-3)  # the baseline is another encoder


def _assert_same_weights(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    different = [key for key in expected if not torch.equal(actual[key], expected[key])]
    assert not different, f"{len(different)} weights differ from the checkpoint's, e.g. {different[:3]}"


def test_finetuning_starts_from_the_given_weights(tiny_pretrained, tiny_prepared, monkeypatch):
    calls = _recorded(monkeypatch, "train_classifier")
    config = FinetuneConfig(label_fractions=[0.5], epochs=1, batch_size=8, min_steps=1)
    evaluate.finetune(tiny_pretrained / "model.pt", tiny_prepared, config, CPU, log=lambda line: None)
    encoder, _ = _encoder_by_hand(tiny_pretrained / "model.pt")
    pretrained_start, scratch_start = calls
    _assert_same_weights(pretrained_start, encoder.state_dict())
    assert any(not torch.equal(scratch_start[key], value) for key, value in encoder.state_dict().items() if value.is_floating_point())


def test_transfer_uses_the_given_weights_for_both_protocols(tiny_pretrained, tiny_prepared, monkeypatch):
    features = _recorded(monkeypatch, "extract")
    starts = _recorded(monkeypatch, "train_classifier")
    config = TransferConfig(l2_grid=[1e-3], max_iter=5, finetune_epochs=1, batch_size=8)
    evaluate.transfer(tiny_pretrained / "model.pt", tiny_prepared, config, CPU, log=lambda line: None)
    encoder, state = _encoder_by_hand(tiny_pretrained / "model.pt")
    train = PreparedDataset(tiny_prepared).images("train")
    with torch.no_grad():
        expected = encoder(batched_test_transform(torch.from_numpy(train.copy()), state["model_config"]["image_size"]))
    torch.testing.assert_close(features[0][1], expected, rtol=1e-4, atol=1e-5)
    _assert_same_weights(starts[0], encoder.state_dict())
