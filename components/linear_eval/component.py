"""KFP component: linear evaluation of a frozen pretrained encoder (`simclr linear-eval`)."""

from kfp import dsl
from kfp.dsl import ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from components.common import DEFAULT_IMAGE


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def linear_eval(
    data: Input[Dataset],
    model: Input[Model],
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
    settings: dict = {},
):
    """Logistic regression on the frozen encoder's features of ``data`` (L2 chosen on val),
    scored on test: ``metrics`` top1/top5, knn_top1 (the test images' weighted kNN among the
    training images) and the random-init baseline's, ``confusion`` the test confusion matrix.
    ``model``: a pretrain Model artifact (directory with model.pt) or a model.pt file.
    ``settings``: `simclr linear-eval` options by params.yaml name."""
    import os
    import tempfile

    from components.common import cli_options, confusion_matrix, log_metrics, model_file, read_json, run_simclr

    with tempfile.TemporaryDirectory() as out:
        run_simclr(["linear-eval", "--model", model_file(model.path), "--data", data.path, "--out", out, *cli_options(settings)])
        log_metrics(metrics, read_json(os.path.join(out, "metrics.json")))
        class_names = read_json(os.path.join(data.path, "manifest.json"))["class_names"]
        rows = read_json(os.path.join(out, "confusion.json"))
    confusion.log_confusion_matrix(class_names, confusion_matrix(rows, class_names))
