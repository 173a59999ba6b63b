"""geocell: photo geolocation as classification over adaptive S2 cells.

The core API takes and returns numpy arrays:

- S2 cells: :func:`latlng_to_cell`, :func:`cell_to_latlng`, :func:`cell_to_boundary`, ...
- the adaptive partitioning of training locations: :func:`partition`,
  :func:`partitions`, :func:`hierarchy`, :class:`Partition`.

Datasets (``geocell.data``), loaders (``geocell.loading``), training (``geocell.training``),
evaluation and prediction (``geocell.infer``, :class:`Geolocator`)
need the ``train`` extra: ``pip install geocell[train]``.
"""

from ._version import __version__
from .cells import (
    EARTH_RADIUS_KM,
    cell_area_km2,
    cell_contains,
    cell_level,
    cell_range,
    cell_to_boundary,
    cell_to_children,
    cell_to_latlng,
    cell_to_parent,
    cell_to_token,
    great_circle_km,
    is_valid_cell,
    latlng_to_cell,
    token_to_cell,
)
from .partition import Partition, hierarchy, partition, partitions

__all__ = [
    "__version__",
    "EARTH_RADIUS_KM",
    "cell_area_km2",
    "Geolocator",
    "Partition",
    "cell_contains",
    "cell_level",
    "cell_range",
    "cell_to_boundary",
    "cell_to_children",
    "cell_to_latlng",
    "cell_to_parent",
    "cell_to_token",
    "great_circle_km",
    "hierarchy",
    "is_valid_cell",
    "latlng_to_cell",
    "partition",
    "partitions",
    "token_to_cell",
]


def __getattr__(name):
    # The predictor needs torch; import it only when asked for.
    if name == "Geolocator":
        from .infer.predict import Geolocator

        return Geolocator
    raise AttributeError(f"module 'geocell' has no attribute {name!r}")
