"""One scanner per dataset layout: `scan_<dataset>(root) -> list[ManifestRow]` with absolute paths,
official labels and folds. The label/split files each one reads are listed in docs/data.md."""

from __future__ import annotations

from collections.abc import Callable

from data_pipelines.adapters.cremad import scan_cremad
from data_pipelines.adapters.dfew import scan_dfew
from data_pipelines.adapters.folder import scan_folder
from data_pipelines.adapters.hicmae import scan_hicmae
from data_pipelines.adapters.mafw import scan_mafw
from data_pipelines.adapters.msp_improv import scan_msp_improv
from data_pipelines.adapters.ravdess import scan_ravdess
from data_pipelines.adapters.voxceleb2 import scan_voxceleb2
from data_pipelines.manifests import ManifestRow

# Keyed like `manifests.DATASETS`.
ADAPTERS: dict[str, Callable[..., list[ManifestRow]]] = {
    "crema-d": scan_cremad,
    "ravdess": scan_ravdess,
    "mafw": scan_mafw,
    "dfew": scan_dfew,
    "msp-improv": scan_msp_improv,
    "voxceleb2": scan_voxceleb2,
    "folder": scan_folder,
    "hicmae": scan_hicmae,
}

__all__ = ["ADAPTERS", *(f.__name__ for f in ADAPTERS.values())]
