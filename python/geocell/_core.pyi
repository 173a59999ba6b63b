# Type stubs of the compiled module geocell._core (use the geocell package, not
# this module: it expects validated, C-contiguous arrays).
import numpy as np
import numpy.typing as npt

# --- S2 ---

F64 = npt.NDArray[np.float64]
U64 = npt.NDArray[np.uint64]

def find_invalid_latlng(lat: F64, lng: F64) -> int:
    """First index with a non-finite or out-of-range latitude or a non-finite longitude; -1 if none."""

def find_invalid_cell(cells: U64) -> int:
    """First index that is not a valid S2 cell id; -1 if none."""

def latlng_to_cell(
    lat: F64, lng: F64, level: int, threads: int = 0, out: U64 | None = None
) -> tuple[U64, int]:
    """Cell ids at `level` (in `out` when given: C-contiguous uint64 of the points' size) and the first
    invalid point's index (-1 if none; then the ids are not all set)."""

def cell_to_latlng(cells: U64, threads: int = 0) -> tuple[F64, F64]:
    """Cell centres (lat, lng) in degrees."""

def cell_to_boundary(cells: U64, threads: int = 0) -> F64:
    """Vertices, shape (N, 4, 2), (lat, lng) degrees, counter-clockwise."""

def great_circle_km(lat1: F64, lng1: F64, lat2: F64, lng2: F64, threads: int = 0) -> F64:
    """Haversine distances in km (R = 6371.0 km)."""

def cell_to_token(cells: U64) -> npt.NDArray[np.bytes_]:
    """Tokens as an "S16" bytes array."""

def token_to_cell(tokens: npt.NDArray[np.bytes_]) -> tuple[U64, int]:
    """Ids of a contiguous "S<n>" array and the first index that is not a valid cell's token (-1 if none)."""

def simd_available() -> bool:
    """Whether this CPU runs a vector path (AVX2/FMA or AVX-512) of latlng_to_cell."""

def set_simd_enabled(enabled: bool) -> None:
    """Switches between the best vector path and the scalar one (results are identical; for tests and benchmarks)."""

def simd_levels() -> list[str]:
    """The paths of latlng_to_cell this CPU runs, best first: from "avx512", "avx2", "scalar"."""

def simd_level() -> str:
    """The path latlng_to_cell takes now."""

def set_simd_level(level: str) -> None:
    """Forces a path (one of simd_levels(); ValueError otherwise). Results are identical."""

def resolve_threads(threads: int) -> int:
    """Number of worker threads `threads` resolves to (0 = all hardware threads)."""


# --- partition ---


def partition_latlng(
    lat: npt.NDArray[np.float64],
    lng: npt.NDArray[np.float64],
    params: list[tuple[int, int, int, int]],
    drop_invalid: bool,
    threads: int,
) -> tuple[
    int,
    int,
    list[
        tuple[
            npt.NDArray[np.uint64],
            npt.NDArray[np.int64],
            npt.NDArray[np.int8],
            npt.NDArray[np.float64],
        ]
    ],
]: ...
def partition_assign_latlng(
    cells: npt.NDArray[np.uint64],
    lat: npt.NDArray[np.float64],
    lng: npt.NDArray[np.float64],
    threads: int,
) -> npt.NDArray[np.int64]: ...
def partition_assign_cells(
    cells: npt.NDArray[np.uint64], queries: npt.NDArray[np.uint64], threads: int
) -> npt.NDArray[np.int64]: ...


# --- image resampling (the DALI loader's CPU path) ---


def resample_normalize(
    images: list[npt.NDArray[np.uint8]],
    boxes: npt.NDArray[np.float64],
    flip: npt.NDArray[np.uint8] | None,
    out: npt.NDArray[np.float32],
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    threads: int = 0,
) -> None:
    """Resizes boxes (left, top, width, height) of HxWx3 uint8 images into out (n, 3, H, W)
    float32 with antialiased bilinear filtering, mirrors where flip, and normalizes
    (v / 255 - mean) / std. ValueError names the image at fault."""

def image_simd_levels() -> list[str]:
    """The vector paths of resample_normalize this CPU runs, best first ("avx2", "scalar")."""

def image_simd_level() -> str:
    """The vector path resample_normalize takes."""

def set_image_simd_level(level: str) -> None:
    """Forces a path (one of image_simd_levels(); ValueError otherwise). Results agree to float
    rounding."""
