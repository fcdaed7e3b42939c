"""Read prepared artifacts (parquet files or Ray-written parquet folders) into sorted pandas frames."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from allmrec.data import schema


def read_parquet(path: str | Path, sort_by: str | None = None) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the job that writes it first (allmrec prepare/encode)")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
        if not files:
            raise FileNotFoundError(f"{path} holds no parquet files")
        df = pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)
    else:
        df = pq.read_table(path).to_pandas()
    if sort_by is not None and len(df):
        df = df.sort_values(sort_by, kind="stable").reset_index(drop=True)
    return df


class Prepared:
    """The prepared dataset of one run folder, loaded lazily (driver-side: O(users + items))."""

    def __init__(self, data_dir: str | Path):
        self.dir = Path(data_dir)
        if not (self.dir / schema.MANIFEST).exists():
            raise FileNotFoundError(f"{self.dir} is not a prepared dataset (no {schema.MANIFEST}): "
                                    "run `allmrec prepare` first")
        self._cache: dict[str, pd.DataFrame] = {}

    def _get(self, name: str, sort_by: str) -> pd.DataFrame:
        if name not in self._cache:
            self._cache[name] = read_parquet(self.dir / name, sort_by)
        return self._cache[name]

    @property
    def items(self) -> pd.DataFrame:
        return self._get(schema.ITEMS, "item")

    @property
    def users(self) -> pd.DataFrame:
        return self._get(schema.USERS, "user")

    @property
    def sequences(self) -> pd.DataFrame:
        return self._get(schema.SEQUENCES, "user")

    def candidates(self, split: str) -> pd.DataFrame:
        name = {"valid": schema.CAND_VALID, "test": schema.CAND_TEST, "cold_users": schema.COLD_USERS}[split]
        return self._get(name, "user")

    @property
    def fewshot(self) -> pd.DataFrame:
        return self._get(schema.FEWSHOT, "user")

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def n_train_users(self) -> int:
        """Users with training sequences (ids 0..n-1); cold users have ids above."""
        return len(self.sequences)

    @property
    def n_users(self) -> int:
        return len(self.users)
