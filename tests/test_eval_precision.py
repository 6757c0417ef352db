"""Evaluation's precision: bf16 autocast on CUDA (where pretraining's rule picks bf16), float32 on
CPUs as before. The CUDA side is tested through its decision and its wiring (the decision forced
on, on a CPU); no GPU is needed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from simclr_core import evaluate
from simclr_core.data import PreparedDataset
from simclr_core.features import extract
from simclr_core.method.augment import batched_test_transform
from simclr_core.pretrain import knn_probe, model_setup

CPU = torch.device("cpu")
SIZE = 16


def _model() -> torch.nn.Module:
    config = {"arch": "resnet18", "image_size": SIZE, "cifar_stem": False, "width_multiplier": 0.125,
              "proj_layers": 2, "proj_hidden_dim": None, "proj_out_dim": 16}
    return evaluate.random_init_model(config, 0, CPU)


def _autocast_seen(module: torch.nn.Module) -> list[torch.dtype]:
    """The dtype of each output ``module`` gives (bf16 only under autocast); filled as it runs."""
    seen: list[torch.dtype] = []
    module.register_forward_hook(lambda _module, _inputs, output: seen.append(output.dtype))
    return seen


@pytest.mark.parametrize(
    ("device", "precision", "native", "expected"),
    [("cuda", "auto", False, True), ("cuda", "bf16", False, True), ("cuda", "fp32", False, False),
     ("cpu", "auto", True, False), ("cpu", "bf16", True, False), ("cpu", "bf16", False, False), ("cpu", "fp32", False, False)],
)
def test_evaluation_picks_bf16_on_cuda_only(monkeypatch, device, precision, native, expected):
    monkeypatch.setattr(model_setup, "_cpu_has_native_bf16", lambda: native)
    assert model_setup.eval_uses_bf16(torch.device(device), precision) is expected
    if precision == "auto":
        assert model_setup.eval_uses_bf16(torch.device(device)) is expected  # what the evaluation stages call


def test_cpu_feature_extraction_is_the_float32_forward_pass():
    model = _model().eval()
    images = np.random.default_rng(0).integers(0, 256, (10, 3, SIZE, SIZE), dtype=np.uint8)
    transform = lambda x: batched_test_transform(x, SIZE)  # noqa: E731
    features = extract(model.encoder, images, transform, CPU, batch_size=4)
    with torch.no_grad():
        expected = model.encoder(transform(torch.from_numpy(images)).contiguous(memory_format=torch.channels_last))
    assert features.dtype == torch.float32 and torch.equal(features, expected)
    in_bf16 = extract(model.encoder, images, transform, CPU, batch_size=4, bf16=True)
    assert in_bf16.dtype == torch.float32 and not torch.equal(in_bf16, expected)  # bf16=True does change the pass
    torch.testing.assert_close(in_bf16, expected, rtol=0.1, atol=0.1)


@pytest.mark.parametrize("forced", [None, True], ids=["cpu-default", "bf16-forced"])
def test_linear_eval_finetune_and_knn_run_in_the_chosen_precision(tiny_prepared, monkeypatch, forced):
    """On a CPU every evaluation forward pass is float32; with the decision forced to bf16 (as on
    CUDA) every one of them runs under autocast: linear eval's features, fine-tuning's training
    steps and its scoring, the pretraining kNN probe."""
    if forced is not None:
        monkeypatch.setattr(evaluate.linear, "eval_uses_bf16", lambda device: forced)
        monkeypatch.setattr(evaluate.semi_supervised, "eval_uses_bf16", lambda device: forced)
        monkeypatch.setattr(knn_probe, "eval_uses_bf16", lambda device: forced)
    expected = torch.bfloat16 if forced else torch.float32
    dataset = PreparedDataset(tiny_prepared)
    size = dataset.image_shape[-1]
    model = _model()
    seen = _autocast_seen(model.encoder)
    evaluate.linear_protocol(model, size, dataset, [1e-3], 5, 0, 64, 0, CPU)
    assert seen and set(seen) == {expected}, "linear eval"
    seen.clear()
    network = evaluate.Classifier(model, 0, dataset.num_classes)
    images, labels = evaluate.labelled(dataset, "train")
    evaluate.train_classifier(network, images, labels, size, 1, 8, 0.01, 0.0, 2, 0, CPU)
    evaluate.score_classifier(network, images, labels, size, CPU)
    assert seen and set(seen) == {expected}, "fine-tuning"
    assert all(p.dtype == torch.float32 for p in network.parameters())  # the weights stay float32
    seen.clear()
    probe = knn_probe.KnnProbe(images, labels, images, labels, dataset.num_classes, 3, 0.1)
    assert 0 <= probe.accuracy(model, size, CPU) <= 1
    assert seen and set(seen) == {expected}, "kNN probe"
