"""Country lookup on known places (borders, islands, both sides of the antimeridian, the open
sea) and the country-accuracy arithmetic on a hand-made example."""

import numpy as np
import pytest

from geocell.infer.countries import country_accuracy, latlng_to_country

PLACES = {
    # name: (lat, lng, ISO code)
    "Paris": (48.8566, 2.3522, "FR"),
    "Strasbourg, west bank of the Rhine": (48.5734, 7.7521, "FR"),
    "Kehl, 5 km east across the Rhine": (48.5727, 7.8157, "DE"),
    "Singapore": (1.2900, 103.8500, "SG"),
    "Johor Bahru, across the strait": (1.4927, 103.7414, "MY"),
    "Valletta, Malta": (35.8990, 14.5140, "MT"),
    "Port Louis, Mauritius": (-20.1600, 57.5000, "MU"),
    "Honolulu": (21.3100, -157.8600, "US"),
    "Suva, Fiji (east of 180)": (-18.1400, 178.4400, "FJ"),
    "Taveuni, Fiji (west of 180)": (-16.8500, -179.9500, "FJ"),
    "Anadyr, Russia (east of 180)": (64.7300, 177.5100, "RU"),
    "Uelen, Russia (west of 180)": (66.1600, -169.8100, "RU"),
    "Hobart, Tasmania": (-42.8800, 147.3300, "AU"),
    "Reykjavik": (64.1400, -21.9400, "IS"),
    "South Pole": (-89.9, 0.0, "AQ"),
    "mid-Pacific": (0.0, -150.0, ""),
    "mid-Atlantic": (30.0, -40.0, ""),
}


def test_known_places():
    lat, lng, want = zip(*PLACES.values())
    got = latlng_to_country(lat, lng)
    assert dict(zip(PLACES, got.tolist())) == dict(zip(PLACES, want))


def test_country_accuracy_by_hand():
    true = np.array([[48.8566, 2.3522],     # Paris
                     [48.5727, 7.8157],     # Kehl
                     [-18.14, 178.44],      # Suva
                     [0.0, -150.0]])        # at sea: not counted
    pred = np.array([[43.2965, 5.3698],     # Marseille: France, right
                     [48.5734, 7.7521],     # Strasbourg: France, wrong
                     [-16.85, -179.95],     # Taveuni, across the antimeridian: Fiji, right
                     [0.0, -150.0]])
    share, counted = country_accuracy(pred, true)
    assert counted == 3 and share == pytest.approx(2 / 3)
    assert np.isnan(country_accuracy(pred[3:], true[3:])[0])


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="differ in length"):
        latlng_to_country([1.0, 2.0], [3.0])
    with pytest.raises(ValueError, match="location 1 is not finite"):
        latlng_to_country([1.0, np.nan], [3.0, 4.0])
    assert latlng_to_country([], []).shape == (0,)
