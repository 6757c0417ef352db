"""Kubeflow Pipelines components: one per step, each a thin map onto the `simclr` CLI.

Each step's folder holds ``component.py`` (a lightweight Python component whose base image is
the project's image) and its compiled, reusable ``component.yaml``
(``kfp.components.load_component_from_file``). ``components.common`` holds the few helpers
the components' bodies import at run time; ``components.launcher`` runs pretraining on this
machine (torchrun) or as a PyTorchJob on a cluster.
"""
