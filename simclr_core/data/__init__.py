"""Prepared datasets: writing them from a source, and reading them back.

The package, bottom up:

- :mod:`~simclr_core.data.images`: reading image folders (regular files only, pixel and size
  budgets, decoding and conversion, skipped files listed);
- :mod:`~simclr_core.data.idx`: IDX files (Fashion-MNIST's format), read within a budget;
- :mod:`~simclr_core.data.archive`: archives of image folders, checked before extraction;
- :mod:`~simclr_core.data.sources`: the built-in sources behind one registry (``SOURCES``) and
  :func:`load_source`;
- :mod:`~simclr_core.data.writer`: :func:`prepare`, which writes a prepared dataset atomically;
- :mod:`~simclr_core.data.prepared`: :class:`PreparedDataset`, the reader (which imports none of
  the above: reading a dataset needs neither PIL nor the sources).

The writer module is not called ``prepare``: the package exports the function :func:`prepare`,
which would hide a submodule of the same name.
"""

from simclr_core.data.prepared import FORMAT_VERSION, DatasetCorrupt, PreparedDataset
from simclr_core.data.sources import DEBIAN_FASHION_MNIST, SOURCES, RawSplits, load_source
from simclr_core.data.writer import class_balanced_subset, prepare
from simclr_core.manifest import SourceError

__all__ = [
    "RawSplits", "prepare", "PreparedDataset", "load_source", "class_balanced_subset", "DEBIAN_FASHION_MNIST",
    "FORMAT_VERSION", "SOURCES", "SourceError", "DatasetCorrupt",
]
