"""``geocell data download``: photos from a list of URLs into geocell's shards.

Input: a CSV with a URL column and ``lat``/``lng`` columns, or GeoEstimation's pair: a URL
list ``image_id,url`` (``mp16_urls.csv``, published without a header) and its metadata
``IMG_ID,LAT,LON[,S3_Label,...]`` (``mp16_places365.csv``), joined on the id. Rows whose
coordinates or labels the manifest rules reject are never fetched.

Fetching is img2dataset's (retries, timeouts, on-the-fly resizing, resumable shards, and its
multiprocessing, pyspark and ray distributors). Its output cannot be geocell's layout (its
tars hold ``KEY.jpg`` + ``KEY.json`` with keys of its own and no DALI index, and geocell's
sample ids are dense over a whole folder), so it writes ``output_format="files"`` into a
staging folder (``OUT/_download/``), and ``shards.pack`` — the one definition of the layout —
packs the downloaded files, keeping the downloader's JPEGs as they are. Files rather than
tars in staging because the progress bar counts them as they land, and pack reads them
directly.

A second run of the same command resumes: img2dataset skips its shards that finished (each
has a ``NNNNN_stats.json``), and the packing is skipped when nothing new arrived. Every URL
that gave no image is listed in ``OUT/failed.csv`` with a reason (``http 404``, ``timeout``,
``not an image``, ``bad coordinates``, ...).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from geocell._internal.atomic import atomic_write
from geocell._internal.progress import progress_bar
from geocell.data.fetch import MAX_IMAGE_PIXELS as _MAX_IMAGE_PIXELS, bounded_img2dataset
from geocell.data.manifest import LAT_COLUMNS, LNG_COLUMNS, find_column
from geocell.data.metadata import KeyedMetadata, read_keyed_metadata
from geocell.data.shards import pack, shard_meta, SHARDS_META

STAGE = "_download"
FAILED_CSV = "failed.csv"
DISTRIBUTORS = ("multiprocessing", "pyspark", "ray")
USER_AGENT_TOKEN = "geocell"
_URL_COLUMNS = ("url", "image_url", "photo_url", "download_url")
_ID_COLUMNS = ("image_id", "img_id", "id", "key", "path", "image", "photo_id")


@dataclass
class Fetch:
    """One URL to fetch: its line in the URL list, source id, URL, metadata row, and the
    URL list's fields when the list is its own metadata."""
    line: int
    source_id: str
    url: str
    meta_row: int
    fields: Optional[dict] = None


@dataclass
class Failure:
    line: int
    source_id: str
    url: str
    reason: str
    detail: str


def _is_url(text: str) -> bool:
    return text.strip().lower().startswith(("http://", "https://"))


def flickr_sized(url: str, size: str) -> str:
    """A Flickr static URL for size suffix ``size`` (``z``: 640 px on the longer side, what
    GeoEstimation downloaded); other URLs, and those that already carry a suffix, unchanged."""
    if not size:
        return url
    m = re.fullmatch(r"(https?://[^/]*staticflickr\.com/.+/\d+_[0-9a-f]+)(\.[A-Za-z]+)", url.strip())
    return f"{m.group(1)}_{size}{m.group(2)}" if m else url


def failure_reason(status: str, message: Optional[str]) -> str:
    """A short, countable reason for one of img2dataset's failures."""
    m = (message or "").lower()
    if status == "failed_to_resize":
        if "decod" in m or "cannot identify" in m:
            return "not an image"
        if "too large" in m:
            return "image too large"
        return "unusable image"
    code = re.search(r"http error (\d{3})", m)
    if code:
        return f"http {code.group(1)}"
    if "timed out" in m or "timeout" in m:
        return "timeout"
    if "x-robots-tag" in m:
        return "disallowed by X-Robots-Tag"
    if "unknown url type" in m or "no host given" in m:
        return "bad url"
    if "urlopen error" in m or "connection" in m or "remote end closed" in m:
        return "connection error"
    return "other error"


def _coordinate_or_metadata(reason: str) -> str:
    return "bad coordinates" if ("latitude" in reason or "longitude" in reason) else "bad metadata"


def _read_url_list(path) -> tuple:
    """(header, [(line, fields)]) of a URL list; GeoEstimation's have no header."""
    rows = []
    # utf-8-sig: a byte-order mark (spreadsheet exports) is not part of the first column's name
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        first = next(reader, None)
        while first is not None and all(not c.strip() for c in first):
            first = next(reader, None)
        if first is None:
            raise ValueError(f"{path}: empty URL list")
        if any(_is_url(c) for c in first):
            if len(first) != 2:
                raise ValueError(f"{path} line {reader.line_num}: a URL list without a header must "
                                 "have two columns, image_id,url (or give a header naming the columns)")
            header = ["image_id", "url"]
            rows.append((reader.line_num, first))
        else:
            header = [h.strip() for h in first]
        for row in reader:
            if row and any(c.strip() for c in row):
                rows.append((reader.line_num, row))
    return header, rows


def _column(header, names, given, what, path) -> Optional[int]:
    if given:
        lowered = [h.lower() for h in header]
        if given.lower() not in lowered:
            raise ValueError(f"{path}: no {what} column {given!r} in header {header}")
        return lowered.index(given.lower())
    return find_column(header, names)


def plan_fetches(urls, stage: Path, metadata=None, *, url_column=None, id_column=None,
                 flickr_size: str = "") -> tuple:
    """Joins the URL list with its metadata: (fetches, failures, KeyedMetadata). Rows with
    no URL, no (usable) metadata, bad coordinates or an id seen before become failures and
    are never fetched."""
    header, rows = _read_url_list(urls)
    i_url = _column(header, _URL_COLUMNS, url_column, "URL", urls)
    if i_url is None:
        raise ValueError(f"{urls}: no URL column in header {header} (expected one of "
                         f"{', '.join(_URL_COLUMNS)}, or --url-column)")
    i_id = _column(header, _ID_COLUMNS, id_column, "id", urls)
    failures = []
    if metadata is not None:
        if i_id is None:
            raise ValueError(f"{urls}: no id column in header {header} to join with {metadata} "
                             f"(expected one of {', '.join(_ID_COLUMNS)}, or --id-column)")
        meta = read_keyed_metadata(metadata)
        keyed = [(line, row[i_id].strip() if len(row) > i_id else "", row) for line, row in rows]
    else:
        if find_column(header, LAT_COLUMNS) is None or find_column(header, LNG_COLUMNS) is None:
            raise ValueError(f"{urls}: no lat/lng columns in header {header}; give them, or "
                             "--metadata with GeoEstimation's IMG_ID,LAT,LON,... joined on the id")
        # The URL list is its own metadata, read by the manifest rules from a copy whose
        # first column, "path" (the column they read as the image), is the line number.
        stage.mkdir(parents=True, exist_ok=True)
        candidates = stage / "candidates.csv"
        with open(candidates, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["path"] + [h for k, h in enumerate(header) if k != i_url])
            for line, row in rows:
                row = [c.replace("\r", " ").replace("\n", " ") for c in row]
                w.writerow([str(line)] + [c for k, c in enumerate(row) if k != i_url])
        meta = read_keyed_metadata(candidates)
        keyed = [(line, str(line), row) for line, row in rows]

    fetches, seen = [], {}
    own_fields = metadata is None
    for line, key, row in keyed:
        url = row[i_url].strip() if len(row) > i_url else ""
        source_id = key if metadata is not None else (
            row[i_id].strip() if i_id is not None and len(row) > i_id else str(line))
        if not url:
            failures.append(Failure(line, source_id, url, "no url", "empty URL field"))
            continue
        if not _is_url(url):
            failures.append(Failure(line, source_id, url, "bad url", "not an http(s) URL"))
            continue
        r = meta.row_of(key)
        if r is None:
            if metadata is None:
                cand_line, why = meta.rejected.get(key, (0, "unusable row"))
                failures.append(Failure(line, source_id, url, _coordinate_or_metadata(why), why))
            else:
                reason, detail = meta.why_missing(key)
                if reason == "bad metadata":
                    reason = _coordinate_or_metadata(detail)
                failures.append(Failure(line, source_id, url, reason, detail))
            continue
        if source_id in seen:
            failures.append(Failure(line, source_id, url, "duplicate id",
                                    f"id {source_id!r} already on line {seen[source_id]}"))
            continue
        seen[source_id] = line
        fields = dict(zip(header, row)) if own_fields else None
        fetches.append(Fetch(line, source_id, flickr_sized(url, flickr_size), r, fields))
    return fetches, failures, meta


# --- staging state -----------------------------------------------------------------------


def _fingerprint(fetches, settings: dict) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for f in fetches:
        h.update(f"{f.url}\t{f.source_id}\n".encode())
    return h.hexdigest()


def _stats_files(folder: Path) -> dict:
    """{shard number: stats} of img2dataset's finished shards."""
    done = {}
    if folder.is_dir():
        for p in folder.glob("*_stats.json"):
            with open(p) as f:
                done[int(p.name.split("_")[0])] = json.load(f)
    return done


def _write_url_table(fetches, meta: KeyedMetadata, path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    m = meta.manifest
    rows = [f.meta_row for f in fetches]
    table = pa.table({
        "url": pa.array([f.url for f in fetches], pa.string()),
        "geocell_row": pa.array(range(len(fetches)), pa.int64()),
        "source_id": pa.array([f.source_id for f in fetches], pa.string()),
        "lat": pa.array(m.lat[rows].tolist() if rows else [], pa.float64()),
        "lng": pa.array(m.lng[rows].tolist() if rows else [], pa.float64()),
    })
    with atomic_write(path, "wb") as f:
        pq.write_table(table, f)


# --- running img2dataset -----------------------------------------------------------------


@contextlib.contextmanager
def _console_to_log(log_path: Path):
    """Sends stdout/stderr (of this process and of the ones it starts) to ``log_path``;
    yields a stream on the real stderr for the progress bar."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    console = os.fdopen(os.dup(saved[1]), "w")
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    try:
        yield console
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, log_fd):
            os.close(fd)
        console.close()


class _Progress(threading.Thread):
    """Counts images as img2dataset writes them (finished shards from their stats, running
    ones by their files) and shows the count and the rate."""

    def __init__(self, folder: Path, done_before: set, total: int, stream):
        super().__init__(daemon=True)
        self.folder, self.done_before = folder, done_before
        self.bar = progress_bar(total, True, "downloading", file=stream, smoothing=0.1)
        self.finished = threading.Event()

    def _count(self) -> int:
        n = 0
        done = _stats_files(self.folder)
        for shard, stats in done.items():
            if shard not in self.done_before:
                n += int(stats.get("count", 0))
        with os.scandir(self.folder) as it:
            for entry in it:
                if entry.is_dir() and entry.name.isdigit() and int(entry.name) not in done:
                    with os.scandir(entry.path) as files:
                        n += sum(1 for e in files if e.name.endswith(".jpg"))
        return n

    def run(self):
        while not self.finished.wait(0.5):
            self._update()

    def _update(self):
        try:
            n = self._count()
        except (OSError, ValueError):  # files appear and vanish while img2dataset works
            return
        if n > self.bar.n:
            self.bar.update(n - self.bar.n)

    def close(self):
        self.finished.set()
        self.join()
        self._update()
        self.bar.close()


def _process_start(pid: int):
    """(process group, start time in clock ticks since boot) of a live process, from /proc; None
    when it is gone (or this is not Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[2]), int(fields[19])  # pgrp, starttime (fields 5 and 22 of stat)


def _end_stale_workers(owner_path: Path) -> int:
    """img2dataset's processes (its logger, multiprocessing's resource tracker, pool workers)
    outlive a download killed with SIGKILL: they keep the killed run's process group. The run
    recorded its process id, group and start time in ``owner_path``; if that run is gone, the
    processes of its group started after it are ended (SIGTERM, then SIGKILL). A group id used
    again by another program since is told apart by the start times. Returns how many ended."""
    try:
        owner = json.loads(owner_path.read_text())
        pid, pgrp, started = int(owner["pid"]), int(owner["pgrp"]), int(owner["start"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    if pid == os.getpid():
        return 0
    alive = _process_start(pid)
    if alive is not None and alive[1] == started:
        raise ValueError(f"another download into {owner_path.parent.parent} is running (process {pid}); "
                         "wait for it or stop it first")
    if pgrp == os.getpgrp():
        return 0
    stale = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if entry.isdigit() and int(entry) != os.getpid():
            info = _process_start(int(entry))
            if info is not None and info[0] == pgrp and info[1] >= started:
                stale.append(int(entry))
    for signum in (signal.SIGTERM, signal.SIGKILL):
        for p in stale:
            try:
                os.kill(p, signum)
            except OSError:
                pass
        deadline = time.monotonic() + 3
        while signum == signal.SIGTERM and time.monotonic() < deadline and any(
                _process_start(p) is not None and _process_start(p)[0] == pgrp for p in stale):
            time.sleep(0.1)
    return len(stale)


def _run_img2dataset(url_table: Path, folder: Path, log_path: Path, *, shorter_side, quality,
                     processes, threads, timeout, retries, distributor, per_shard, progress_total,
                     progress: bool):
    if distributor == "pyspark":
        try:
            import pyspark  # noqa: F401
        except ImportError:
            raise ValueError("--distributor pyspark needs pyspark (pip install pyspark)") from None
    if distributor == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:  # img2dataset would silently do nothing
            raise ValueError("--distributor ray needs ray (pip install ray)") from None
    from img2dataset import download as img2dataset_download

    done_before = set(_stats_files(folder))
    owner_path = log_path.parent / "owner.json"
    ended = _end_stale_workers(owner_path)
    if ended:
        print(f"ended {ended} processes left behind by a download into the same folder that was killed",
              file=sys.stderr)
    me = _process_start(os.getpid())
    if me is not None:
        with atomic_write(owner_path, "w") as f:
            json.dump({"pid": os.getpid(), "pgrp": me[0], "start": me[1]}, f)
    previous_sigint = signal.getsignal(signal.SIGINT)
    # img2dataset's processes import wandb, which makes temporary folders at import and leaves
    # them behind when the pool terminates its workers: they go to a folder removed after.
    tempfile.gettempdir()  # this process keeps its own temporary folder
    scratch = log_path.parent / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    previous_tmpdir = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(scratch)
    bar = None
    # bounded_img2dataset: bytes and seconds per URL in all (geocell.data.fetch)
    with _console_to_log(log_path) as console, bounded_img2dataset():
        try:
            if progress:
                folder.mkdir(parents=True, exist_ok=True)
                bar = _Progress(folder, done_before, progress_total, console)
                bar.start()
            img2dataset_download(
                url_list=str(url_table),
                input_format="parquet",
                url_col="url",
                save_additional_columns=["geocell_row", "source_id", "lat", "lng"],
                output_folder=str(folder),
                output_format="files",
                # The shorter side at most shorter_side; smaller images are kept as they are,
                # and a JPEG that needs no resize keeps its bytes (no second lossy encode).
                resize_mode="keep_ratio" if shorter_side else "no",
                resize_only_if_bigger=True,
                image_size=shorter_side or 0,
                encode_format="jpg",
                encode_quality=quality,
                skip_reencode=True,
                max_image_area=_MAX_IMAGE_PIXELS,
                processes_count=processes,
                thread_count=threads,
                timeout=timeout,
                retries=retries,
                distributor=distributor,
                number_sample_per_shard=per_shard,
                incremental_mode="incremental",
                extract_exif=False,
                compute_hash=None,
                user_agent_token=USER_AGENT_TOKEN,
                enable_wandb=False,
            )
        except SystemExit:
            # img2dataset's SIGINT handler exits with status 0; an interruption is not success.
            raise KeyboardInterrupt from None
        finally:
            signal.signal(signal.SIGINT, previous_sigint)
            if previous_tmpdir is None:
                os.environ.pop("TMPDIR", None)
            else:
                os.environ["TMPDIR"] = previous_tmpdir
            shutil.rmtree(scratch, ignore_errors=True)
            if bar is not None:
                bar.close()
            # img2dataset returned (or raised) with its processes ended: nothing left to clean up
            with contextlib.suppress(OSError):
                owner_path.unlink()


# --- collecting and packing --------------------------------------------------------------


def _collect(folder: Path, fetches: list) -> tuple:
    """Reads every finished shard's status table: ({fetch index: staged jpg}, [Failure],
    fetch indices img2dataset reported on)."""
    import pyarrow.parquet as pq

    staged, failures, reported = {}, [], set()
    for shard in sorted(_stats_files(folder)):
        table = pq.read_table(folder / f"{shard:05d}.parquet",
                              columns=["geocell_row", "key", "status", "error_message"]).to_pydict()
        for g, key, status, message in zip(table["geocell_row"], table["key"], table["status"],
                                           table["error_message"]):
            g = int(g)
            reported.add(g)
            f = fetches[g]
            if status == "success":
                path = folder / f"{shard:05d}" / f"{key}.jpg"
                if path.is_file():
                    staged[g] = str(path)
                else:
                    failures.append(Failure(f.line, f.source_id, f.url, "staged file missing", str(path)))
            else:
                failures.append(Failure(f.line, f.source_id, f.url,
                                        failure_reason(status, message), message or status))
    return staged, failures, reported


def _write_failed(path: Path, failures: list):
    with atomic_write(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["line", "id", "url", "reason", "detail"])
        for x in sorted(failures, key=lambda x: (x.line, x.reason)):
            w.writerow([x.line, x.source_id, x.url, x.reason, x.detail])


def download(urls, out_dir, *, metadata=None, url_column: Optional[str] = None,
             id_column: Optional[str] = None, shorter_side: Optional[int] = 320,
             max_side: Optional[int] = None, quality: int = 90, shard_size: int = 5000,
             processes: int = 1, threads: int = 4, timeout: float = 10, retries: int = 0,
             distributor: str = "multiprocessing", urls_per_staging_shard: int = 1000,
             flickr_size: str = "", workers: int = 2, progress: bool = True) -> dict:
    """Downloads the photos of a URL list into geocell shards under ``out_dir``; returns a
    summary (counts by outcome, failures by reason, bytes, seconds). See the module doc."""
    if distributor not in DISTRIBUTORS:
        raise ValueError(f"distributor must be one of {', '.join(DISTRIBUTORS)}, not {distributor!r}")
    for name, value in (("processes", processes), ("threads", threads),
                        ("urls_per_staging_shard", urls_per_staging_shard)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, not {value}")
    start = time.monotonic()
    out_dir = Path(out_dir)
    stage = out_dir / STAGE
    folder = stage / "img2dataset"
    fetches, failures, meta = plan_fetches(urls, stage, metadata, url_column=url_column,
                                           id_column=id_column, flickr_size=flickr_size)
    stage.mkdir(parents=True, exist_ok=True)
    rows_in_list = len(fetches) + len(failures)

    # The staged shards are only valid for the URL list and settings that made them.
    settings = {"shorter_side": shorter_side, "quality": quality, "per_shard": urls_per_staging_shard}
    fingerprint = _fingerprint(fetches, settings)
    state_path = stage / "state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    if state.get("input") not in (None, fingerprint):
        raise ValueError(f"{stage} holds a download of another URL list or with other settings "
                         f"(shorter side, quality, URLs per staging shard); remove {stage} to "
                         "start over, or choose another output folder")
    state["input"] = fingerprint
    state_path.write_text(json.dumps(state, indent=1))

    n_staging_shards = math.ceil(len(fetches) / urls_per_staging_shard)
    done_before = _stats_files(folder)
    todo = [s for s in range(n_staging_shards) if s not in done_before]
    if todo:
        url_table = stage / "urls.parquet"
        _write_url_table(fetches, meta, url_table)
        total = sum(min(urls_per_staging_shard, len(fetches) - s * urls_per_staging_shard) for s in todo)
        _run_img2dataset(url_table, folder, stage / "img2dataset.log", shorter_side=shorter_side,
                         quality=quality, processes=processes, threads=threads, timeout=timeout,
                         retries=retries, distributor=distributor, per_shard=urls_per_staging_shard,
                         progress_total=total, progress=progress)
    done_now = _stats_files(folder)
    staged, fetch_failures, reported = _collect(folder, fetches)
    failures += fetch_failures
    new_shards = set(done_now) - set(done_before)
    fetched_now = sum(int(done_now[s].get("count", 0)) for s in new_shards)
    new_rows = [g for g in staged if g // urls_per_staging_shard in new_shards]
    bytes_now = sum(os.path.getsize(staged[g]) for g in new_rows)

    # Packing is a function of the staged files and its settings: skipped when neither changed
    # (a staged shard is known by its number and when img2dataset finished it).
    order = sorted(staged)
    pack_settings = {"shards": [[s, done_now[s].get("end_time")] for s in sorted(done_now)],
                     "shorter_side": shorter_side, "max_side": max_side, "quality": quality,
                     "shard_size": shard_size}
    packed = None

    if order and (state.get("packed") != pack_settings or not (out_dir / SHARDS_META).is_file()):
        m = meta.manifest.subset([fetches[g].meta_row for g in order])
        m.paths = [staged[g] for g in order]
        m.report = []
        extra = [{"source_id": fetches[g].source_id, "url": fetches[g].url,
                  "source_line": fetches[g].line,
                  "meta": fetches[g].fields or meta.fields(fetches[g].meta_row)}
                 for g in order]
        summary = pack(m, out_dir, shard_size=shard_size, shorter_side=shorter_side,
                       max_side=max_side, quality=quality, workers=workers, progress=progress,
                       extra_json=extra, keep_jpeg=True)
        packed = summary["count"]
        state["packed"] = pack_settings
        state["pack_skipped"] = [[int(r), p, why] for r, p, why in summary["skipped_rows"]]
        state_path.write_text(json.dumps(state, indent=1))
    elif order:
        packed = shard_meta(out_dir)["count"]
    for r, _path, why in state.get("pack_skipped", []):
        f = fetches[order[r]]
        failures.append(Failure(f.line, f.source_id, f.url, "not an image", why))

    _write_failed(out_dir / FAILED_CSV, failures)
    not_attempted = len(fetches) - len(reported)
    return {
        "urls": rows_in_list,
        "fetched_now": fetched_now,
        "downloaded": len(staged),
        "packed": packed or 0,
        "failed": dict(Counter(x.reason for x in failures)),
        "not_attempted": not_attempted,
        "bytes_now": bytes_now,
        "seconds": time.monotonic() - start,
        "output": str(out_dir),
    }


def format_summary(s: dict) -> str:
    lines = [f"{s['downloaded']} of {s['urls']} photos downloaded ({s['fetched_now']} URLs tried in this run, "
             f"{s['bytes_now'] / 1e6:.1f} MB stored, {s['seconds']:.1f} s); "
             f"{s['packed']} packed into {s['output']}"]
    total_failed = sum(s["failed"].values())
    if total_failed:
        lines.append(f"{total_failed} failed (listed in {s['output']}/{FAILED_CSV}):")
        for reason, n in sorted(s["failed"].items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {n:8d}  {reason}")
    if s["not_attempted"]:
        lines.append(f"{s['not_attempted']} URLs not tried yet: run the same command again to resume")
    return "\n".join(lines)
