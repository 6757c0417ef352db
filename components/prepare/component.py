"""KFP component: prepare a dataset (`simclr prepare`) into a Dataset artifact directory."""

from kfp import dsl
from kfp.dsl import Dataset, Output

from components.common import DEFAULT_IMAGE


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def prepare(
    dataset: Output[Dataset],
    source: str = "fashion-mnist",
    source_root: str = "",
    download: bool = False,
    val_fraction: float = 0.05,
    max_train: int = 0,
    image_size: int = 0,
    label_fractions: list = [0.01, 0.1],
    seed: int = 0,
    settings: dict = {},
):
    """Read ``source`` (fashion-mnist, cifar10, cifar100, stl10, digits, imagefolder) from
    ``source_root`` and write the prepared dataset (uint8 arrays, labels, manifest, label
    subsets) into ``dataset``. ``settings``: any other `simclr prepare` option by its
    params.yaml name."""
    from components.common import cli_options, read_json, run_simclr

    options = cli_options(
        settings, source=source, source_root=source_root, download=download, val_fraction=val_fraction,
        max_train=max_train, image_size=image_size, label_fractions=label_fractions, seed=seed,
    )
    run_simclr(["prepare", "--out", dataset.path, *options])
    manifest = read_json(f"{dataset.path}/manifest.json")
    dataset.metadata["source"] = manifest["source"]
    dataset.metadata["image_shape"] = manifest["image_shape"]
    dataset.metadata["class_names"] = manifest["class_names"]
    for split, info in manifest["splits"].items():
        dataset.metadata[f"{split}_images"] = info["images"]
