"""The Kubeflow pipeline that chains the components, with its compile and submit entry points."""
