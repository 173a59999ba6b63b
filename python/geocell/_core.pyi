
# --- partition ---
import numpy as _np
import numpy.typing as _npt

def partition_latlng(
    lat: _npt.NDArray[_np.float64],
    lng: _npt.NDArray[_np.float64],
    params: list[tuple[int, int, int, int]],
    drop_invalid: bool,
    threads: int,
) -> tuple[
    int,
    int,
    list[
        tuple[
            _npt.NDArray[_np.uint64],
            _npt.NDArray[_np.int64],
            _npt.NDArray[_np.int8],
            _npt.NDArray[_np.float64],
        ]
    ],
]: ...
def partition_assign_latlng(
    cells: _npt.NDArray[_np.uint64],
    lat: _npt.NDArray[_np.float64],
    lng: _npt.NDArray[_np.float64],
    threads: int,
) -> _npt.NDArray[_np.int64]: ...
def partition_assign_cells(
    cells: _npt.NDArray[_np.uint64], queries: _npt.NDArray[_np.uint64], threads: int
) -> _npt.NDArray[_np.int64]: ...
