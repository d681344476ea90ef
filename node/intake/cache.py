"""The training view of the intake: preprocessed arrays, memory-mapped, with their labels.

Arrays live in fixed-shape shards, `<state>/cache/<digest16>/<token>.npy` of shape
(n, C, H, W), one per intake batch; the index maps each keyed instance hash to a (shard,
row). The directory is named by the preprocessing digest, so a new preprocessing config
never reads arrays made by another. Each shard is memory-mapped once; an item is a view.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from node.errors import NodeError
from node.intake import index
from node.intake.preprocess import PreprocessConfig
from node.intake.worker import shard_path

UNLABELLED = -1


class CachedDataset(Sequence[tuple[np.ndarray, int]]):
    """Ingested instances for one preprocessing config: `ds[i] -> (array (C,H,W), label)`.

    `label` is an index into `label_set`, or -1 (UNLABELLED) for an image with no usable
    label (still fine for inference). `split` selects "train" or "test" from the manifest;
    None keeps both. The arrays are read-only memory maps.
    """

    def __init__(
        self,
        state_dir: Path,
        cfg: PreprocessConfig,
        *,
        split: str | None = None,
        labelled_only: bool = False,
    ) -> None:
        if split not in (None, "train", "test"):
            raise ValueError(f"split must be 'train', 'test' or None, got {split!r}")
        self.state_dir = Path(state_dir)
        self.cfg = cfg
        self.digest = cfg.digest()
        if not index.index_path(self.state_dir).is_file():
            raise NodeError(
                f"no intake index under {self.state_dir}; run `tessera node ingest` first"
            )
        conn = index.connect(self.state_dir)
        try:
            stored = json.loads(index.get_meta(conn, "label_set") or "[]")
            rows = list(index.labelled_instances(conn, self.digest))
        finally:
            conn.close()
        if stored:
            label_set = tuple(str(x) for x in stored)
        else:  # no study label set configured: the labels seen, sorted, define it
            label_set = tuple(sorted({row[1] for row in rows if row[1] is not None}))
        self.label_set: tuple[str, ...] = label_set
        lookup = {name: i for i, name in enumerate(label_set)}
        keys: list[str] = []
        labels: list[int] = []
        places: list[tuple[str, int]] = []
        for key, label, row_split, shard, row in rows:
            value = lookup.get(label, UNLABELLED) if label is not None else UNLABELLED
            if split is not None and row_split != split:
                continue
            if labelled_only and value == UNLABELLED:
                continue
            keys.append(key)
            labels.append(value)
            places.append((shard, row))
        self.keys: tuple[str, ...] = tuple(keys)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.cache_dir = self.state_dir / "cache"
        self._places = places
        self._shards: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        """Number of instances in this view."""
        return len(self.keys)

    def array(self, i: int) -> np.ndarray:
        """The i-th preprocessed array (C, H, W): a read-only view into a mapped shard."""
        shard, row = self._places[i]
        mapped = self._shards.get(shard)
        if mapped is None:
            try:
                mapped = np.load(shard_path(self.cache_dir, self.digest, shard), mmap_mode="r")
            except FileNotFoundError:
                raise NodeError(
                    f"cache shard {shard} is missing; rerun `tessera node ingest` to rebuild it"
                ) from None
            self._shards[shard] = mapped
        image: np.ndarray = mapped[row]
        return image

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:  # type: ignore[override]
        """(array, label index) of the i-th instance."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} instances")
        return self.array(i), int(self.labels[i])

    def stack(self) -> tuple[np.ndarray, np.ndarray]:
        """All arrays loaded into one (N, C, H, W) float32 array, with the labels."""
        shape = (len(self), self.cfg.channels, self.cfg.size, self.cfg.size)
        out = np.empty(shape, dtype=np.float32)
        for i in range(len(self)):
            out[i] = self.array(i)
        return out, self.labels.copy()
