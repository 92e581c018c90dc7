"""The prediction sink: one writer for JSON lines, CSV and Parquet, used by every engine.

Rows go to a unique ``<path>.<random>.partial`` beside ``path`` that :meth:`PredictionWriter.close` places
(:class:`sensor.atomic.StagedOutput`): a run that succeeded replaces ``path``; after an error or Ctrl-C what
was written is kept, in ``path`` when there was none, else in the .partial, never replacing an existing
file. The writer counts frames and accuracy, overall and per value of an optional leading identity column
(``recording`` or ``camera`` for the Ray engines).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sensor.atomic import StagedOutput
from sensor.errors import ConfigError, PrivcamError

PREDICTION_FIELDS = ("frame_index", "label", "pred", "confidence")
OUTPUT_SUFFIXES = (".jsonl", ".csv", ".parquet")
_PARQUET_ROWS = 65536  # rows buffered per Parquet row group


class PredictionWriter:
    """Predictions (dicts with :data:`PREDICTION_FIELDS`) to .jsonl, .csv or .parquet, or only counted.

    Args:
        path: output file, or None to count only.
        total: frames expected (for the progress bar), or None.
        progress: show a tqdm bar.
        lead: name of a leading identity column (``recording``, ``camera``), or None.
    """

    def __init__(self, path: str | None, total: int | None = None, progress: bool = False,
                 lead: str | None = None) -> None:
        self.path = Path(path) if path else None
        if self.path is not None and self.path.suffix not in OUTPUT_SUFFIXES:
            raise ConfigError("output", "predictions", f"a path ending in one of {OUTPUT_SUFFIXES}", str(path))
        self.lead = lead
        self.fields = PREDICTION_FIELDS if lead is None else (lead, *PREDICTION_FIELDS)
        self.count = self.labelled = self.correct = 0
        self.per: dict[Any, list[int]] = {}  # lead value -> [frames, labelled, correct]
        self._fh, self._csv, self._parquet, self._rows, self._staged = None, None, None, [], None
        self.final_path: Path | None = None
        self.note: str | None = None
        if self.path is not None:
            if self.path.suffix == ".parquet":
                try:
                    import pyarrow.parquet as pq
                except ImportError:
                    raise ConfigError("output", "predictions", ".jsonl or .csv (.parquet needs pyarrow: "
                                      "pip install 'privcam[ray]')", str(path)) from None
            self._staged = StagedOutput(self.path)
            tmp = self._staged.path
            try:
                if self.path.suffix == ".parquet":
                    self._parquet = pq.ParquetWriter(tmp, self._arrow_schema())
                else:
                    self._fh = open(tmp, "w", newline="")  # noqa: SIM115 - closed in close()
                    if self.path.suffix == ".csv":
                        self._csv = csv.DictWriter(self._fh, fieldnames=self.fields)
                        self._csv.writeheader()
            except BaseException:
                self._staged.discard()
                raise
        self._bar = tqdm(total=total, unit="frame", desc="frames", disable=not progress, smoothing=0.1)

    def _arrow_schema(self):
        import pyarrow as pa

        columns = [("frame_index", pa.int64()), ("label", pa.int64()), ("pred", pa.int64()),
                   ("confidence", pa.float64())]
        if self.lead is not None:
            columns.insert(0, (self.lead, pa.string() if self.lead == "recording" else pa.int64()))
        return pa.schema(columns)

    def __call__(self, rows: list[dict[str, Any]]) -> None:
        """Engine sink: one batch of predictions without a lead value."""
        self.write(None, rows)

    def write(self, lead_value: Any, preds: list[dict[str, Any]]) -> None:
        """Write one batch of predictions made for ``lead_value`` (None without a lead column)."""
        stats = self.per.setdefault(lead_value, [0, 0, 0])
        for p in preds:
            row = {k: p[k] for k in PREDICTION_FIELDS}
            if self.lead is not None:
                row = {self.lead: lead_value, **row}
            stats[0] += 1
            if p["label"] is not None:
                stats[1] += 1
                stats[2] += int(p["pred"] == p["label"])
            if self._csv is not None:
                self._csv.writerow(row)
            elif self._fh is not None:
                self._fh.write(json.dumps(row) + "\n")
            elif self._parquet is not None:
                self._rows.append(row)
        if len(self._rows) >= _PARQUET_ROWS:
            self._flush_parquet()
        self.count += len(preds)
        self.labelled = sum(s[1] for s in self.per.values())
        self.correct = sum(s[2] for s in self.per.values())
        self._bar.update(len(preds))
        if self.labelled:
            self._bar.set_postfix(accuracy=f"{self.correct / self.labelled:.4f}")

    def _flush_parquet(self) -> None:
        if self._rows:
            import pyarrow as pa

            self._parquet.write_table(pa.Table.from_pylist(self._rows, schema=self._arrow_schema()))
            self._rows = []

    def stats(self, lead_value: Any) -> dict[str, Any]:
        frames, labelled, correct = self.per.get(lead_value, [0, 0, 0])
        return {"frames": frames, "labelled": labelled, "accuracy": correct / labelled if labelled else None}

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    def close(self, ok: bool = True) -> Path | None:
        """Flush and place the file (see the module docstring). Idempotent.

        ``ok`` is False after a failed or interrupted run. Returns where the predictions are (None when
        counting only, or when the run failed before writing any); :attr:`note` says why that is not
        ``path``. Raises PrivcamError when the file cannot be flushed (e.g. a full disk).
        """
        self._bar.close()
        if self._staged is None:
            return self.final_path
        staged, self._staged = self._staged, None
        try:
            if self._parquet is not None:
                self._flush_parquet()
                self._parquet.close()
            elif self._fh is not None:
                self._fh.close()
        except Exception as err:  # noqa: BLE001 - a full disk: keep what was written, say where
            if self.count == 0:
                staged.discard()
                raise PrivcamError(f"{self.path}: cannot write predictions ({type(err).__name__}: {err})") from None
            self.final_path = staged.path
            self.note = (f"{self.path} was not written: cannot flush the predictions ({type(err).__name__}: {err}); "
                         f"what was written is in {staged.path}")
            raise PrivcamError(self.note) from None
        self.final_path = staged.finish(ok, self.count > 0)
        self.note = staged.note
        return self.final_path
