"""Generic CSV loading for historian exports and simulator output (stdlib csv + numpy).

Every problem a user can cause raises :class:`trainer.errors.InputError` with one line naming
the file, and where it helps the line and column. Missing cells (empty, NaN, NA, null) become
NaN: the agent carries the last good value forward, exactly as on the gateway.
"""
from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from trainer.errors import InputError

log = logging.getLogger("trainer")

TIME_NAMES = ("timestamp", "time", "datetime", "date", "ts")
MISSING = {"", "nan", "na", "n/a", "null", "none", "-"}
# Ground truth must never become a sensor: a label column used as a feature would "detect"
# anomalies by reading the answer. Left out of the default feature set (use --features to force).
LABEL_NAMES = {"label", "labels", "anomaly", "anomalies", "is_anomaly", "anomalous", "fault", "faults", "fault_type",
               "changepoint", "change_point", "target", "class", "attack", "machine_status"}
_TRUE = {"1", "true", "yes", "y", "anomaly", "abnormal", "fault"}
_FALSE = {"0", "false", "no", "n", "normal", "ok", ""}


@dataclass(frozen=True)
class CsvOptions:
    """How to read a CSV; shared by fit, score and evaluate."""

    delimiter: str | None = None  # None: sniff ',', ';' or tab from the header line
    time_col: str | None = None  # None: auto-detect by name; "none": no time column
    features: list[str] | None = None  # None: every numeric column not otherwise used
    exclude: list[str] = field(default_factory=list)
    label_col: str | None = None
    fault_col: str | None = None


@dataclass
class Table:
    """One CSV file, parsed."""

    path: Path
    features: list[str]
    values: np.ndarray  # (T, F) float32, NaN = missing
    timestamps: np.ndarray  # (T,) float64 epoch seconds; the row index when there is no time column
    time_text: list[str]  # the time cells as written (row index without a time column)
    time_col: str | None = None
    label: np.ndarray | None = None  # (T,) int8, 1 = anomalous
    fault: list[str] | None = None  # (T,) fault type names as written

    @property
    def rows(self) -> int:
        return int(self.values.shape[0])

    def sample_period_s(self) -> float | None:
        """Median spacing of the time column, None without one."""
        if self.time_col is None or self.rows < 2:
            return None
        d = np.diff(self.timestamps)
        d = d[np.isfinite(d) & (d > 0)]
        return float(np.median(d)) if d.size else None


def split_names(text: str | None) -> list[str] | None:
    """'a, b' -> ['a', 'b'] (option parsing helper)."""
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    return names


def sniff_delimiter(header_line: str) -> str:
    counts = {d: header_line.count(d) for d in (",", ";", "\t")}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] else ","


def _read_rows(path: Path, delimiter: str | None) -> tuple[list[str], list[list[str]], list[int], str]:
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a UTF-8 text file") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    lines = text.splitlines()
    first = next((ln for ln in lines if ln.strip()), None)
    if first is None:
        raise InputError(f"{path}: empty file")
    if delimiter is None:
        delimiter = sniff_delimiter(first)
    if len(delimiter) != 1:
        raise InputError(f"delimiter must be one character, got {delimiter!r}")
    reader = csv.reader(lines, delimiter=delimiter)
    header: list[str] | None = None
    rows: list[list[str]] = []
    line_nos: list[int] = []
    try:
        for cells in reader:
            if not any(c.strip() for c in cells):
                continue
            if header is None:
                header = [c.strip() for c in cells]
                while header and header[-1] == "" and len(header) > 1:
                    header.pop()  # trailing delimiter on the header line
                continue
            if len(cells) > len(header) and not any(c.strip() for c in cells[len(header):]):
                cells = cells[: len(header)]
            if len(cells) != len(header):
                raise InputError(
                    f"{path}: line {reader.line_num}: {len(cells)} cells, header has {len(header)} "
                    f"(delimiter {delimiter!r}; set --delimiter if that is wrong)"
                )
            rows.append(cells)
            line_nos.append(reader.line_num)
    except csv.Error as e:
        raise InputError(f"{path}: line {reader.line_num}: {e}") from None
    assert header is not None
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise InputError(f"{path}: column {name!r} appears twice in the header")
        seen.add(name)
    if not rows:
        raise InputError(f"{path}: no data rows under the header")
    return header, rows, line_nos, delimiter


def _to_float(cell: str, decimal_comma: bool) -> float | None:
    """Float value, NaN for missing, None when the cell is not a number."""
    s = cell.strip()
    if s.lower() in MISSING:
        return math.nan
    if decimal_comma and "," in s and "." not in s:
        s = s.replace(",", ".")
    try:
        v = float(s)
    except ValueError:
        return None
    return v if math.isfinite(v) else math.nan


def _parse_time(cell: str) -> float:
    """Epoch seconds (or milliseconds) or ISO 8601 -> epoch seconds; NaN if empty; raises ValueError."""
    s = cell.strip()
    if s.lower() in MISSING:
        return math.nan
    try:
        v = float(s)
    except ValueError:
        pass
    else:
        return v / 1000.0 if abs(v) > 1e11 else v  # epoch ms are > 1e11 from 1973 on
    for candidate in (s, s.replace("/", "-")):
        try:
            dt = datetime.fromisoformat(candidate)
        except ValueError:
            continue
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)  # naive historian times are taken as UTC
        return dt.timestamp()
    raise ValueError(s)


def _parse_label(cell: str) -> int | None:
    s = cell.strip().lower()
    if s in _TRUE:
        return 1
    if s in _FALSE:
        return 0
    try:
        v = float(s)
    except ValueError:
        return None
    return 0 if v == 0 or not math.isfinite(v) else 1


def _is_index_name(name: str) -> bool:
    # pandas writes its row index as an unnamed first column; a counter is never a sensor.
    return name == "" or name.lower().startswith("unnamed:") or name.lower() == "index"


def _norm(name: str) -> str:
    return "".join(c for c in name.lower() if c.isalnum())


def _detect_time_col(header: list[str], rows: list[list[str]]) -> str | None:
    """A column named like time (``Time Stamp``, ``date_time``...), else the first text column
    whose first non-empty cell reads as an ISO 8601 date."""
    for h in header:
        if _norm(h) in TIME_NAMES or _norm(h) in {"timestamps", "datetimes", "zeit", "zeitstempel"}:
            return h
    for j, h in enumerate(header):
        first = next((r[j].strip() for r in rows if r[j].strip()), "")
        try:
            float(first)
            continue
        except ValueError:
            pass
        try:
            _parse_time(first)
        except ValueError:
            continue
        return h
    return None


def load_csv(path: str | Path, opts: CsvOptions | None = None) -> Table:
    """Read one CSV into a :class:`Table` according to ``opts``."""
    opts = opts or CsvOptions()
    path = Path(path)
    header, rows, line_nos, delim = _read_rows(path, opts.delimiter)
    col = {name: i for i, name in enumerate(header)}
    shown = ", ".join(header[:12]) + (", ..." if len(header) > 12 else "")

    def need(name: str, what: str) -> int:
        if name not in col:
            raise InputError(f"{path}: unknown {what} column {name!r} (columns: {shown})")
        return col[name]

    if opts.time_col is not None and opts.time_col.lower() == "none":
        time_name = None
    elif opts.time_col is not None:
        need(opts.time_col, "time")
        time_name = opts.time_col
    else:
        time_name = _detect_time_col(header, rows)
    label_i = need(opts.label_col, "label") if opts.label_col else None
    fault_i = need(opts.fault_col, "fault") if opts.fault_col else None
    reserved = {n for n in (time_name, opts.label_col, opts.fault_col) if n}
    for name in opts.exclude:
        need(name, "excluded")

    decimal_comma = delim != ","
    explicit = opts.features is not None
    if explicit:
        names = list(opts.features or [])
        for name in names:
            need(name, "feature")
            if name in reserved:
                raise InputError(f"{path}: column {name!r} cannot be both a feature and the time/label/fault column")
    else:
        names = []
        for h in header:
            if h in reserved or h in opts.exclude or _is_index_name(h):
                continue
            if h.lower() in LABEL_NAMES:
                log.warning("%s: column %r looks like ground truth, not a sensor: left out of the features "
                            "(use --label-col for it, or --features to force it in)", path, h)
                continue
            names.append(h)

    features: list[str] = []
    columns: list[np.ndarray] = []
    for name in names:
        j = col[name]
        out = np.empty(len(rows), np.float64)
        bad: int | None = None
        numeric = 0
        for r, cells in enumerate(rows):
            v = _to_float(cells[j], decimal_comma)
            if v is None:
                if bad is None:
                    bad = r
                out[r] = math.nan
            else:
                out[r] = v
                numeric += not math.isnan(v)
        if bad is not None:
            if not explicit and numeric == 0:
                log.warning("%s: skipping non-numeric column %r", path, name)
                continue
            raise InputError(
                f"{path}: line {line_nos[bad]}, column {name!r}: not a number: {rows[bad][j].strip()[:40]!r}"
            )
        features.append(name)
        columns.append(out)
    if not features:
        raise InputError(f"{path}: no numeric feature columns (columns: {shown})")
    values = np.stack(columns, axis=1).astype(np.float32)

    if time_name is not None:
        ti = col[time_name]
        ts = np.empty(len(rows), np.float64)
        for r, cells in enumerate(rows):
            try:
                ts[r] = _parse_time(cells[ti])
            except ValueError:
                raise InputError(
                    f"{path}: line {line_nos[r]}, column {time_name!r}: not a timestamp "
                    f"(epoch seconds/ms or ISO 8601): {cells[ti].strip()[:40]!r}"
                ) from None
        time_text = [cells[ti].strip() for cells in rows]
    else:
        ts = np.arange(len(rows), dtype=np.float64)
        time_text = [str(i) for i in range(len(rows))]

    label = None
    if label_i is not None:
        label = np.zeros(len(rows), np.int8)
        for r, cells in enumerate(rows):
            v = _parse_label(cells[label_i])
            if v is None:
                raise InputError(
                    f"{path}: line {line_nos[r]}, column {opts.label_col!r}: label must be 0/1, "
                    f"got {cells[label_i].strip()[:40]!r}"
                )
            label[r] = v
    fault = [cells[fault_i].strip() for cells in rows] if fault_i is not None else None
    return Table(path, features, values, ts, time_text, time_name, label, fault)


def load_many(paths: list[str | Path], opts: CsvOptions | None = None) -> list[Table]:
    """Several files of one machine type: the same features, in the first file's order."""
    if not paths:
        raise InputError("no CSV files given")
    tables = [load_csv(paths[0], opts)]
    feats = tables[0].features
    for p in paths[1:]:
        o = opts or CsvOptions()
        t = load_csv(p, CsvOptions(o.delimiter, o.time_col, feats, [], o.label_col, o.fault_col))
        tables.append(t)
    return tables
