"""The run directory: the one source of truth for a run's results on disk.

Layout of a run directory::

    run.json          what rebuilds the run: model import path and init args, data, loss, notes
    settings.json     sampler settings used for every estimate (nbeta, step size, chains, ...)
    llc.csv           the λ̂ table, one row per step (``step, llc_mean, llc_std, ...``)
    llc_components.csv  λ̂ per component, one row per (component, step) (``component, step,
                      llc_mean, llc_std, ...``); stages_components.json: their stages
    metrics.csv       training / validation metrics by step (``step, train_loss, ...``)
    stages.json       developmental stages found by the stage detector
    snapshots/        ``step_000000123.pt``: weights only, ``torch.load(weights_only=True)``
    traces/           ``step_000000123.npy``: per-chain loss traces, shape (chain, draw)
    influence/        ``step_000000123.csv``: the Bayesian influence of training samples on a
                      fixed probe set at that checkpoint, long format (``step, train_index,
                      query_index, influence, se, kind, status, reason``; a failed step is one
                      row with empty indices); ``query_inputs.npy``, ``train_inputs.npy`` and
                      ``train_index.npy``: the inputs that draw them (when saved)
    susceptibilities.csv  component × probe susceptibilities by step (``step, component,
                      probe, susceptibility, se``)

Every write is atomic (temporary file + ``os.replace``), so a reader never sees a partial file,
and every table write is a read-modify-write under an exclusive file lock (``filelock``: POSIX and
Windows), so several processes (post-hoc workers, a dashboard reader) can share one run
directory. Rows are keyed by ``step`` (the component table by ``component, step``): writing a
key again replaces its row (idempotent), it never duplicates it.

Every λ̂ row records what it was estimated from: ``settings_id``, a short hash of the sampler
settings that change λ̂ (:func:`settings_id`), and ``snapshot_sha256``, the digest of the
weights file. :func:`load_run` flags rows whose settings differ from the run's
(``settings_mismatch``, :attr:`Run.mixed_settings`), and ``devinterp estimate`` re-estimates a
row whose snapshot was rewritten.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import math
import os
import stat
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from filelock import FileLock

__all__ = ["CALIBRATION_FILE", "COMPONENTS_FILE", "COMPONENT_KEY", "COMPONENT_STAGES_FILE",
           "ESTIMATOR_DEFAULTS", "INFLUENCE_COLUMNS", "INFLUENCE_DIR", "LLC_FILE", "METRICS_FILE", "RUN_FILE",
           "SETTINGS_FILE", "SUSCEPTIBILITIES_FILE", "SUSCEPTIBILITY_COLUMNS",
           "SETTINGS_ID_KEYS", "SNAPSHOT_DIR", "STAGES_FILE", "TRACE_DIR", "MixedSettingsError",
           "Run", "RunStore", "atomic_write_bytes", "file_sha256", "load_run", "open_regular",
           "read_regular_bytes", "settings_id", "snapshot_name"]

LLC_FILE = "llc.csv"
METRICS_FILE = "metrics.csv"
SETTINGS_FILE = "settings.json"
RUN_FILE = "run.json"
STAGES_FILE = "stages.json"
#: Run-level sampler settings by settings id (:mod:`devinterp.tracking.calibration`).
CALIBRATION_FILE = "calibration.json"
SNAPSHOT_DIR = "snapshots"
TRACE_DIR = "traces"
#: The long table of per-component λ̂ rows, keyed by :data:`COMPONENT_KEY`.
COMPONENTS_FILE = "llc_components.csv"
#: Stages of every component's curve: ``{component: [stage, ...]}``.
COMPONENT_STAGES_FILE = "stages_components.json"
COMPONENT_KEY = ("component", "step")
#: One CSV per checkpoint of probe influence, and the inputs that draw it.
INFLUENCE_DIR = "influence"
#: Columns of :attr:`Run.influence` (one row per (step, train sample, query sample)).
INFLUENCE_COLUMNS = ("step", "train_index", "query_index", "influence", "se", "kind", "status",
                     "reason")
_INFLUENCE_INPUTS = ("query_inputs", "train_inputs", "train_index")
#: Component × probe susceptibilities, long format, by step.
SUSCEPTIBILITIES_FILE = "susceptibilities.csv"
SUSCEPTIBILITY_COLUMNS = ("step", "component", "probe", "susceptibility", "se")
#: Columns a λ̂ table read by :func:`load_run` always has (empty before the first estimate).
_LLC_COLUMNS = (("llc_mean", "float64"), ("llc_std", "float64"), ("status", "object"),
                ("reason", "object"))
_LOCK_FILE = ".lock"

#: Estimator options that change λ̂, hashed into each row's ``settings_id``
#: (``chain_chunk_size`` and ``vectorize`` give the same numbers and are left out).
SETTINGS_ID_KEYS = ("num_chains", "num_draws", "num_burnin", "batch_size", "step_size",
                    "localization", "nbeta", "sampler", "seed", "num_samples", "weights")


#: :func:`devinterp.estimate_llc`'s defaults for those keys (``num_burnin``: half the draws;
#: ``nbeta``: n/log n; ``num_samples``: the data's length). Spelled out here so reading a run
#: never imports torch; ``tests/test_store_integrity.py`` checks them against the estimator.
ESTIMATOR_DEFAULTS = {"num_chains": 8, "num_draws": 400, "batch_size": 256, "step_size": "auto",
                      "localization": 1.0, "sampler": "rmsprop_sgld", "seed": 0,
                      "max_draws": 3200}


class MixedSettingsError(ValueError):
    """A λ̂ row would join a table whose other rows were estimated with other settings."""


def settings_id(settings: Mapping[str, Any]) -> str:
    """A 12-hex-digit hash of the sampler settings in ``settings`` that change λ̂.

    ``settings`` holds options as requested (``settings.json``, or the options of a command);
    a missing or ``None`` option counts as the estimator's default, so ``num_draws=400`` and the
    default hash alike. ``step_size="auto"`` hashes as ``"auto"``: the step it picks may differ
    between checkpoints, the procedure does not.
    """
    resolved: dict[str, Any] = {}
    for k in SETTINGS_ID_KEYS:
        v = settings.get(k)
        resolved[k] = ESTIMATOR_DEFAULTS.get(k) if v is None else v
    if resolved["num_burnin"] is None and isinstance(resolved["num_draws"], int):
        resolved["num_burnin"] = resolved["num_draws"] // 2
    if resolved["num_draws"] == "auto":  # the budget changes λ̂ only then
        resolved["max_draws"] = settings.get("max_draws") or ESTIMATOR_DEFAULTS["max_draws"]
    for k in ("step_size", "localization", "nbeta"):
        if isinstance(resolved[k], (int, float)) and not isinstance(resolved[k], bool):
            resolved[k] = float(resolved[k])
    if resolved["weights"] is not None:
        resolved["weights"] = list(resolved["weights"])
    text = json.dumps(resolved, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def open_regular(path: str | os.PathLike) -> io.BufferedReader:
    """Open a regular file for reading; a FIFO, a device or a socket raises ValueError naming
    the path instead of blocking (a directory: IsADirectoryError, as ``open`` raises).

    A run directory is untrusted input: a FIFO named ``settings.json`` would make a plain
    ``open`` wait forever for a writer. The file is opened non-blocking and checked with
    ``fstat`` on the open descriptor, so it cannot be swapped between the check and the read.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):  # as open() says it
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), os.fspath(path))
        if not stat.S_ISREG(mode):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
            raise ValueError(f"{os.fspath(path)} is {kind}, not a regular file; replace it "
                             "with the file it should be, or delete it")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of a regular file (see :func:`open_regular`: never blocks on a FIFO)."""
    with open_regular(path) as f:
        return f.read()


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 hex digest of a file's bytes (a regular file: :func:`open_regular`)."""
    h = hashlib.sha256()
    with open_regular(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half.

    ``durable=False`` skips the fsync: the file is still whole after a killed process, but an
    operating-system crash may leave it empty (fine for files whose readers skip bad ones).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return repr(obj)


def _clean_json(obj: Any) -> Any:
    """Replace non-finite floats by None: JSON has no NaN, and browsers reject it."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): _clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean_json(v) for v in obj]
    return obj


def snapshot_name(step: int) -> str:
    """File name of the weight snapshot (and trace) taken at ``step``."""
    return f"step_{int(step):09d}"


class RunStore:
    """Reads and writes one run directory (see the module docstring for the layout).

    Args:
        path: the run directory.
        create: create the directory if missing. Raises ``PermissionError`` naming the path when
            it cannot be written, so a run fails before training rather than after hours.

    Attributes (how :meth:`write_llc_row` stamps rows; a command that estimates sets them):
        row_settings: the requested sampler settings of the rows being written, hashed into
            ``settings_id``. Default (None): ``settings.json``'s.
        row_sources: weight file by step, digested into ``snapshot_sha256`` (default: the
            step's snapshot in this directory, when there is one).
        row_guard: called as ``row_guard(table, row)`` under the lock before a row is written,
            with the table as it is on disk; it raises to refuse the row.
    """

    def __init__(self, path: str | os.PathLike, *, create: bool = False) -> None:
        self.path = Path(path)
        self.row_settings: Mapping[str, Any] | None = None
        self.row_sources: dict[int, Path] = {}
        self.row_guard: Callable[[pd.DataFrame, dict[str, Any]], None] | None = None
        if create:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                # A uniquely named probe: several processes (DDP ranks, post-hoc workers) open
                # one run directory at once.
                with tempfile.NamedTemporaryFile(dir=self.path, prefix=".write_probe."):
                    pass
            except OSError as e:
                raise PermissionError(
                    f"run directory {str(self.path)!r} is not writable ({e.strerror or e}); "
                    "choose a dirpath you can write to"
                ) from e
        elif not self.path.is_dir():
            raise FileNotFoundError(f"run directory {str(self.path)!r} does not exist")

    # -- locking -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive lock over the run directory's tables (across processes and threads: a
        new lock object, hence a new file handle, per call)."""
        with FileLock(str(self.path / _LOCK_FILE)).acquire(poll_interval=0.005):
            yield

    # -- JSON documents ------------------------------------------------------------------------
    def write_json(self, name: str, obj: Any) -> None:
        """Atomically write a JSON document (non-finite floats become null)."""
        text = json.dumps(_clean_json(obj), indent=2, default=_json_default, allow_nan=False)
        atomic_write_bytes(self.path / name, text.encode() + b"\n")

    def read_json(self, name: str, default: Any = None) -> Any:
        """Read a JSON document, or ``default`` when it does not exist."""
        p = self.path / name
        if not p.exists():
            return default
        try:
            return json.loads(read_regular_bytes(p))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{p} is not valid JSON ({e}); restore it or delete it") from e

    def update_json(self, name: str, updates: Mapping[str, Any]) -> dict:
        """Merge ``updates`` into a JSON object document under the lock; returns the result."""
        with self.lock():
            doc = self.read_json(name, {}) or {}
            doc.update(updates)
            self.write_json(name, doc)
        return doc

    # -- step-keyed tables ---------------------------------------------------------------------
    def read_table(self, name: str) -> pd.DataFrame:
        """A step-keyed CSV table sorted by step (empty with a ``step`` column if missing)."""
        p = self.path / name
        if not p.exists():
            return pd.DataFrame({"step": pd.Series([], dtype="int64")})
        data = read_regular_bytes(p)
        if not data:
            return pd.DataFrame({"step": pd.Series([], dtype="int64")})
        try:
            df = pd.read_csv(io.BytesIO(data))
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise ValueError(f"{p} is not a readable CSV table ({e})") from e
        if "step" not in df.columns:
            raise ValueError(f"{p} has no 'step' column; it is not a devinterp table")
        df["step"] = _integer_steps(df["step"], p)
        return df.sort_values("step", kind="stable").reset_index(drop=True)

    def upsert_rows(self, name: str, rows: list[Mapping[str, Any]],
                    key: tuple[str, ...] = ("step",)) -> None:
        """Insert or replace rows by ``key`` (columns that must include ``step``) in a CSV
        table, atomically and under the lock; rows of other keys stay as they are."""
        if not rows:
            return
        if "step" not in key:
            raise ValueError(f"a table's key must include 'step', got {key!r}")
        for r in rows:
            missing = [k for k in key if k not in r]
            if missing:
                raise ValueError(f"every row of {name} needs the key columns {list(key)}; a row "
                                 f"lacks {missing}")
        with self.lock():
            self._write_table(name, _upserted(self.read_table(name), rows, key))

    def read_components(self) -> pd.DataFrame:
        """The per-component λ̂ table (``component, step, ...``) sorted by component then step;
        empty with the columns of :attr:`Run.components` when none was written."""
        table = self.read_table(COMPONENTS_FILE)
        table["component"] = (table["component"].astype(str) if "component" in table.columns
                              else pd.Series([], dtype="object"))
        for col, dtype in _LLC_COLUMNS:
            if col not in table.columns:
                table[col] = pd.Series([None] * len(table), dtype=dtype)
        first = ["component", "step"]
        table = table[first + [c for c in table.columns if c not in first]]
        return table.sort_values(first, kind="stable").reset_index(drop=True)

    def _write_table(self, name: str, table: pd.DataFrame) -> None:
        atomic_write_bytes(self.path / name, table.to_csv(index=False).encode())

    def write_llc_row(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """Insert or replace the λ̂ row of ``row["step"]``, stamped with ``settings_id`` and
        ``snapshot_sha256`` (see the class attributes) unless it has them; returns the row
        written. ``row_guard`` may refuse it (e.g. :class:`MixedSettingsError`)."""
        row = dict(row)
        if "step" not in row:
            raise ValueError("every row needs a 'step' key")
        step = int(row["step"])
        if "settings_id" not in row:
            settings = self.row_settings
            if settings is None:
                try:
                    stored = self.read_json(SETTINGS_FILE)
                except ValueError:  # unreadable: the row is still written (training goes on)
                    stored = None
                settings = stored if isinstance(stored, Mapping) else None
            if settings is not None:
                row["settings_id"] = settings_id(settings)
        if "snapshot_sha256" not in row:
            source = self.row_sources.get(step, self.snapshot_path(step))
            if source.is_file():
                row["snapshot_sha256"] = file_sha256(source)
        with self.lock():
            table = self.read_table(LLC_FILE)
            if self.row_guard is not None:
                self.row_guard(table, row)
            self._write_table(LLC_FILE, _upserted(table, [row]))
        return row

    def write_metrics(self, rows: list[Mapping[str, Any]]) -> None:
        """Insert or replace training-metric rows (merging columns of an existing step)."""
        if not rows:
            return
        with self.lock():
            old = self.read_table(METRICS_FILE)
            merged: dict[int, dict[str, Any]] = {}
            for r in old.to_dict("records"):
                merged[int(r["step"])] = r
            for r in rows:
                step = int(r["step"])
                cur = merged.setdefault(step, {"step": step})
                cur.update({k: v for k, v in r.items() if v is not None})
            df = pd.DataFrame(sorted(merged.values(), key=lambda r: r["step"]))
            df["step"] = df["step"].astype("int64")
            self._write_table(METRICS_FILE, df)

    # -- influence and susceptibilities ----------------------------------------------------
    def write_influence(self, step: int, frame: pd.DataFrame | None = None, *,
                        kind: str = "covariance", reason: str | None = None) -> None:
        """Write (or replace) the probe influence of checkpoint ``step``.

        Args:
            step: the checkpoint.
            frame: columns ``train_index`` (the training sample), ``query_index`` (its
                position in the probe set), ``influence`` and ``se``; None with ``reason``
                for a checkpoint without an estimate (one failed row).
            kind: ``"covariance"`` or ``"correlation"`` (see :mod:`devinterp.influence`).
            reason: why there is no estimate (a failed row).
        """
        if (frame is None) == (reason is None):
            raise ValueError("write_influence takes a frame of influence, or the reason "
                             "there is none, not both")
        if frame is None:
            table = pd.DataFrame([{"step": int(step), "train_index": None, "query_index": None,
                                   "influence": math.nan, "se": math.nan, "kind": kind,
                                   "status": "failed", "reason": reason}])
        else:
            missing = {"train_index", "query_index", "influence", "se"} - set(frame.columns)
            if missing:
                raise ValueError(f"an influence frame needs the columns train_index, "
                                 f"query_index, influence, se; it lacks {sorted(missing)}")
            table = pd.DataFrame({
                "step": int(step), "train_index": frame["train_index"].astype("int64"),
                "query_index": frame["query_index"].astype("int64"),
                "influence": frame["influence"].astype("float64"),
                "se": frame["se"].astype("float64"), "kind": kind, "status": "ok",
                "reason": ""})
        name = f"{INFLUENCE_DIR}/{snapshot_name(step)}.csv"
        atomic_write_bytes(self.path / name, table.to_csv(index=False).encode())

    def read_influence(self) -> pd.DataFrame:
        """Every checkpoint's probe influence as one long table (:data:`INFLUENCE_COLUMNS`),
        sorted by step, query and training sample; empty with those columns when none."""
        d = self.path / INFLUENCE_DIR
        parts = [self.read_table(f"{INFLUENCE_DIR}/{p.name}")
                 for p in sorted(d.glob("step_*.csv"))] if d.is_dir() else []
        parts = [p for p in parts if len(p)]
        if not parts:
            return _empty_influence()
        table = pd.concat(parts, ignore_index=True)
        for col in ("train_index", "query_index"):
            table[col] = table[col].astype("Int64")
        table["reason"] = table["reason"].astype(object).where(table["reason"].notna(), "")
        table = table[list(INFLUENCE_COLUMNS)]
        return table.sort_values(["step", "query_index", "train_index"], kind="stable",
                                 na_position="first").reset_index(drop=True)

    def save_influence_inputs(self, query_inputs: np.ndarray | None,
                              train_inputs: np.ndarray | None,
                              train_index: np.ndarray) -> None:
        """Keep the inputs of the probe (query) set and of the training samples whose
        influence is recorded (row k of ``train_inputs`` is training sample
        ``train_index[k]``), so the dashboard can draw them (e.g. as image thumbnails)."""
        arrays = {"query_inputs": query_inputs, "train_inputs": train_inputs,
                  "train_index": np.asarray(train_index, dtype=np.int64)}
        for name, array in arrays.items():
            if array is None:
                continue
            buf = io.BytesIO()
            np.save(buf, np.asarray(array), allow_pickle=False)
            atomic_write_bytes(self.path / INFLUENCE_DIR / f"{name}.npy", buf.getvalue())

    def influence_inputs(self) -> dict[str, np.ndarray]:
        """The saved ``query_inputs``, ``train_inputs`` and ``train_index`` arrays (those
        present)."""
        out = {}
        for name in _INFLUENCE_INPUTS:
            p = self.path / INFLUENCE_DIR / f"{name}.npy"
            if p.exists():
                with open_regular(p) as f:
                    out[name] = np.load(f, allow_pickle=False)
        return out

    def write_susceptibilities(self, step: int, frame: pd.DataFrame) -> None:
        """Write (or replace) the susceptibilities of checkpoint ``step``: the DataFrame of
        :func:`devinterp.estimate_susceptibilities` (``component, probe, susceptibility,
        se``), its row order kept (the heatmap's order), under the lock."""
        missing = set(SUSCEPTIBILITY_COLUMNS[1:]) - set(frame.columns)
        if missing:
            raise ValueError(f"a susceptibility frame needs the columns component, probe, "
                             f"susceptibility, se; it lacks {sorted(missing)}")
        new = frame[list(SUSCEPTIBILITY_COLUMNS[1:])].astype({"component": str, "probe": str})
        new.insert(0, "step", int(step))
        with self.lock():
            old = self.read_table(SUSCEPTIBILITIES_FILE)
            old = old[old["step"] != int(step)]
            table = pd.concat([old, new], ignore_index=True) if len(old) else new
            self._write_table(SUSCEPTIBILITIES_FILE,
                              table.sort_values("step", kind="stable").reset_index(drop=True))

    def read_susceptibilities(self) -> pd.DataFrame:
        """The susceptibility table (:data:`SUSCEPTIBILITY_COLUMNS`), sorted by step; empty
        with those columns when none was written."""
        table = self.read_table(SUSCEPTIBILITIES_FILE)
        if not len(table):
            return _empty_susceptibilities()
        for col in ("component", "probe"):
            table[col] = table[col].astype(str)
        return table[list(SUSCEPTIBILITY_COLUMNS)]

    # -- snapshots and traces ------------------------------------------------------------------
    def snapshot_path(self, step: int) -> Path:
        """Where the weight snapshot of ``step`` is (or would be) saved."""
        return self.path / SNAPSHOT_DIR / f"{snapshot_name(step)}.pt"

    def save_snapshot(self, step: int, state_dict: Mapping[str, Any]) -> Path:
        """Save weights (tensors only) for ``step``, atomically; returns the file path.

        Not fsynced (as ``torch.save`` and Lightning's checkpoints are not): the fsync was most
        of a snapshot's cost during training (``tools/bench_callback.py``), and a snapshot left
        empty by an operating-system crash is named and skipped by ``devinterp estimate``.
        """
        import torch

        buf = io.BytesIO()
        torch.save({k: v.detach().cpu().clone() for k, v in state_dict.items()}, buf)
        p = self.snapshot_path(step)
        atomic_write_bytes(p, buf.getvalue(), durable=False)
        return p

    def snapshots(self) -> dict[int, Path]:
        """Snapshot files by step."""
        d = self.path / SNAPSHOT_DIR
        out: dict[int, Path] = {}
        if d.is_dir():
            for p in d.glob("step_*.pt"):
                with contextlib.suppress(ValueError):
                    out[int(p.stem.split("_", 1)[1])] = p
        return dict(sorted(out.items()))

    def save_trace(self, step: int, loss_trace: np.ndarray) -> None:
        """Save the per-chain loss trace of the estimate at ``step``, shape (chain, draw)."""
        buf = io.BytesIO()
        np.save(buf, np.asarray(loss_trace, dtype=np.float32), allow_pickle=False)
        atomic_write_bytes(self.path / TRACE_DIR / f"{snapshot_name(step)}.npy", buf.getvalue())

    def load_trace(self, step: int) -> np.ndarray | None:
        """The loss trace (chain, draw) of the estimate at ``step``, or None."""
        p = self.path / TRACE_DIR / f"{snapshot_name(step)}.npy"
        if not p.exists():
            return None
        with open_regular(p) as f:
            return np.load(f, allow_pickle=False)

    def trace_steps(self) -> list[int]:
        """Steps whose loss traces are saved."""
        d = self.path / TRACE_DIR
        if not d.is_dir():
            return []
        return sorted(int(p.stem.split("_", 1)[1]) for p in d.glob("step_*.npy"))


def _integer_steps(steps: pd.Series, path: Path) -> pd.Series:
    """The ``step`` column as int64, or ValueError naming the file and the first bad value
    (a blank, a fraction or a word: the table was edited or is not a devinterp table)."""
    numbers = pd.to_numeric(steps, errors="coerce")
    bad = ~np.isfinite(numbers) | (numbers != numbers.round())
    if bad.any():
        value = steps[bad].iloc[0]
        raise ValueError(f"{path}: 'step' must be a whole number in every row, got {value!r} "
                         f"in data row {int(bad.to_numpy().argmax()) + 1}; fix or delete that row")
    return numbers.astype("int64")


def _upserted(old: pd.DataFrame, rows: list[Mapping[str, Any]],
              key: tuple[str, ...] = ("step",)) -> pd.DataFrame:
    """``old`` with ``rows`` inserted or replacing the rows of their keys, sorted by key (key
    columns other than ``step`` compare as text: that is how they read back from CSV)."""
    cols = list(key)
    new = pd.DataFrame([dict(r) for r in rows])
    new["step"] = new["step"].astype("int64")
    for c in cols:
        if c != "step":
            new[c] = new[c].astype(str)
    new = new.drop_duplicates(cols, keep="last")
    if len(old):
        old = old.copy()
        for c in cols:
            if c != "step":
                old[c] = old[c].astype(str)
        replaced = pd.MultiIndex.from_frame(old[cols]).isin(pd.MultiIndex.from_frame(new[cols]))
        old = old[~replaced]
        new = pd.concat([old, new], ignore_index=True) if len(old) else new
    return new.sort_values(cols, kind="stable").reset_index(drop=True)


@dataclass
class Run:
    """A run directory read into memory.

    Attributes:
        path: the run directory.
        llc: λ̂ table, one row per step, columns ``step, llc_mean, llc_std, ..., status,
            reason`` (present even before the first estimate), and ``settings_mismatch``: True
            where the row's ``settings_id`` differs from the run's settings (``settings.json``,
            else the last row's).
        metrics: logged training / validation metrics, one row per step.
        settings: sampler settings (``settings.json``).
        meta: what rebuilds the run (``run.json``).
        stages: stages found by the detector (``stages.json``), a list of dicts.
        snapshots: weight snapshot files by step.
        components: per-component λ̂, one row per (component, step), columns ``component,
            step, llc_mean, llc_std, ..., status, reason`` (``llc_components.csv``; empty with
            those columns when the run has none).
        component_stages: stages of every component's curve (``stages_components.json``:
            ``{component: [stage, ...]}``), or None when not detected.
        influence: probe influence by checkpoint (``influence/``), one row per (step,
            train_index, query_index): ``influence, se, kind, status, reason``; a failed
            checkpoint is one row with empty indices; empty with those columns when none.
        susceptibilities: ``step, component, probe, susceptibility, se``
            (``susceptibilities.csv``; empty with those columns when none).
        calibration: the run-level sampler settings (``calibration.json``: by settings id,
            ``step_size``, ``nbeta``, ``calibrated_on``, ``changes`` where ε was lowered);
            empty when the run chose none.
    """

    path: Path
    llc: pd.DataFrame
    metrics: pd.DataFrame
    settings: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    stages: list = field(default_factory=list)
    snapshots: dict = field(default_factory=dict)
    components: pd.DataFrame = field(default_factory=lambda: _empty_components())
    component_stages: dict | None = None
    influence: pd.DataFrame = field(default_factory=lambda: _empty_influence())
    susceptibilities: pd.DataFrame = field(default_factory=lambda: _empty_susceptibilities())
    calibration: dict = field(default_factory=dict)

    @property
    def mixed_settings(self) -> bool:
        """True when the λ̂ rows were not all estimated with the same sampler settings."""
        if "settings_id" not in self.llc.columns:
            return False
        return self.llc["settings_id"].dropna().nunique() > 1

    @property
    def name(self) -> str:
        """The run's name (``run.json``'s, else the directory's)."""
        return str(self.meta.get("name") or self.path.name)

    def trace(self, step: int) -> np.ndarray | None:
        """Per-chain loss trace (chain, draw) of the estimate at ``step``, if saved."""
        return RunStore(self.path).load_trace(step)

    @property
    def trace_steps(self) -> list[int]:
        """Steps whose chain loss traces were saved."""
        return RunStore(self.path).trace_steps()

    def influence_inputs(self) -> dict[str, np.ndarray]:
        """The saved inputs of the probe set and the training samples of :attr:`influence`
        (``query_inputs``, ``train_inputs``, ``train_index``; those saved)."""
        return RunStore(self.path).influence_inputs()


def load_run(path: str | os.PathLike) -> Run:
    """Read a run directory written by :class:`devinterp.LLCCallback` or ``devinterp run``."""
    store = RunStore(path)
    llc = store.read_table(LLC_FILE)
    for col, dtype in _LLC_COLUMNS:
        if col not in llc.columns:
            llc[col] = pd.Series([None] * len(llc), dtype=dtype)
    settings = store.read_json(SETTINGS_FILE, {}) or {}
    llc["settings_mismatch"] = _settings_mismatch(llc, settings)
    stages = store.read_json(STAGES_FILE, [])
    if isinstance(stages, Mapping):
        stages = stages.get("stages", [])
    return Run(
        path=store.path,
        llc=llc,
        metrics=store.read_table(METRICS_FILE),
        settings=settings if isinstance(settings, dict) else {},
        meta=store.read_json(RUN_FILE, {}) or {},
        stages=list(stages),
        snapshots=store.snapshots(),
        components=store.read_components(),
        component_stages=_component_stages(store),
        influence=store.read_influence(),
        susceptibilities=store.read_susceptibilities(),
        calibration=_calibration(store),
    )


def _calibration(store: RunStore) -> dict:
    """``calibration.json`` as a dict (``{}`` when missing or not an object)."""
    doc = store.read_json(CALIBRATION_FILE, {})
    return doc if isinstance(doc, dict) else {}


def _empty_components() -> pd.DataFrame:
    """:attr:`Run.components` of a run without component curves."""
    return pd.DataFrame({"component": pd.Series([], dtype="object"),
                         "step": pd.Series([], dtype="int64"),
                         **{c: pd.Series([], dtype=d) for c, d in _LLC_COLUMNS}})


def _empty_influence() -> pd.DataFrame:
    """:attr:`Run.influence` of a run without probe influence."""
    dtypes = {"step": "int64", "train_index": "Int64", "query_index": "Int64",
              "influence": "float64", "se": "float64"}
    return pd.DataFrame({c: pd.Series([], dtype=dtypes.get(c, "object"))
                         for c in INFLUENCE_COLUMNS})


def _empty_susceptibilities() -> pd.DataFrame:
    """:attr:`Run.susceptibilities` of a run without susceptibilities."""
    return pd.DataFrame({c: pd.Series([], dtype="int64" if c == "step" else
                                      "float64" if c in ("susceptibility", "se") else "object")
                         for c in SUSCEPTIBILITY_COLUMNS})


def _component_stages(store: RunStore) -> dict | None:
    """``stages_components.json``, or None; ValueError naming the file when it is not an
    object of stage lists (it was edited, or is not devinterp's)."""
    doc = store.read_json(COMPONENT_STAGES_FILE)
    if doc is None:
        return None
    if not isinstance(doc, dict) or not all(isinstance(v, list) for v in doc.values()):
        raise ValueError(f"{store.path / COMPONENT_STAGES_FILE} must map each component to a "
                         "list of stages; delete it and detect the stages again")
    return doc


def _settings_mismatch(llc: pd.DataFrame, settings: Any) -> pd.Series:
    """Per row: was it estimated with other settings than the run's? The run's are
    ``settings.json``'s, else those of the row of the last step; rows without a
    ``settings_id`` (tables written before rows carried one) are not flagged."""
    if "settings_id" not in llc.columns or not len(llc):
        return pd.Series([False] * len(llc), dtype=bool, index=llc.index)
    ids = llc["settings_id"]
    known = ids.notna()
    if isinstance(settings, Mapping) and settings:
        reference = settings_id(settings)
    elif known.any():
        reference = ids[known].iloc[-1]
    else:
        reference = None
    return (known & (ids != reference)).astype(bool)
