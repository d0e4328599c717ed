"""Inner-product top-k over unit vectors with faiss (exact `flat`, or approximate `hnsw` for large corpora)."""
from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

INDEX_KINDS = ("flat", "hnsw")


class VectorIndex:
    """Rows of `vectors` (N, D), L2-normalised, so the inner product is the cosine similarity.

    `flat` is exact and fine up to ~10^5-10^6 rows; `hnsw` (M = `hnsw_m` links per node) trades a little recall
    for sub-linear search beyond that. `threads` caps faiss' OpenMP threads: tool servers share cores.
    """

    def __init__(self, vectors: np.ndarray, kind: str = "flat", hnsw_m: int = 32, threads: int = 1) -> None:
        import faiss  # imported here so that backends without vectors never pay for it

        if kind not in INDEX_KINDS:
            raise ValueError(f"unknown vector index kind {kind!r}; expected one of {INDEX_KINDS}")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] == 0:
            raise ValueError(f"VectorIndex needs a non-empty (N, D) matrix, got shape {vectors.shape}")
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        faiss.omp_set_num_threads(threads)
        self.dim = vectors.shape[1]
        self.size = vectors.shape[0]
        if kind == "flat":
            self._index = faiss.IndexFlatIP(self.dim)
        else:
            self._index = faiss.IndexHNSWFlat(self.dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        self._index.add(normalise_rows(vectors))
        self.kind = kind

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (B, min(k, N)), best first; ids are row numbers of the indexed matrix."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be (B, {self.dim}), got shape {queries.shape}")
        scores, ids = self._index.search(normalise_rows(queries), min(k, self.size))
        return scores, ids


def normalise_rows(matrix: np.ndarray) -> np.ndarray:
    """Each row divided by its L2 norm (zero rows stay zero)."""
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return np.ascontiguousarray(matrix / np.maximum(norms, 1e-12), dtype=np.float32)
