"""Placeholder: the numpy API over the S2 core lands here."""


def _missing(*args, **kwargs):
    raise NotImplementedError


cell_contains = cell_level = cell_range = cell_to_boundary = cell_to_children = _missing
cell_to_latlng = cell_to_parent = cell_to_token = great_circle_km = is_valid_cell = _missing
latlng_to_cell = token_to_cell = _missing
