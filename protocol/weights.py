"""Reading published weights, for any role (actors use it; the learner writes the same formats): reassembly of
`WeightBucket`s (whole tensors and row chunks) and the shared-filesystem layout of the `fs` transport.

zmq: buckets 0..num_buckets−1 of one version; a tensor larger than a bucket arrives as row chunks
(`NamedArray.row_offset/total_rows`) spread over consecutive buckets. bf16 travels as its raw uint16 bits.

fs: a directory D holds one folder per version and one manifest, replaced atomically (write + rename) after the
version's files are complete, so a reader never sees a half-written version:

    D/manifest.json                          {"v": 1, "version": 7, "folder": "v00000007",
                                              "files": ["model-00000.safetensors", ...], "num_tensors": 56,
                                              "dtype": "bfloat16", "created_unix": 1.7e9}
    D/v00000007/model-00000.safetensors     safetensors, HF checkpoint naming, whole tensors
The writer keeps the newest `keep` versions' folders so a reader that read the previous manifest can finish.
Imports torch (and safetensors for fs) lazily; nothing else of forage.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import msgspec
import numpy as np

from protocol.arrays import from_ndarray
from protocol.errors import ProtocolError
from protocol.files import write_atomic
from protocol.messages import WeightBucket

if TYPE_CHECKING:
    import torch

FS_MANIFEST = "manifest.json"
FS_FORMAT_VERSION = 1


class FsManifest(msgspec.Struct, kw_only=True):
    """What `manifest.json` of an fs weight directory says (format above)."""

    v: int = FS_FORMAT_VERSION
    version: int
    folder: str
    files: list[str]
    num_tensors: int
    dtype: str = ""
    created_unix: float = 0.0


def assemble_weight_buckets(buckets: Sequence[WeightBucket]) -> tuple[int, dict[str, "torch.Tensor"]]:
    """All buckets of one version (any order) → (version, {name: CPU tensor}); bf16 comes back as torch.bfloat16,
    other dtypes as sent. Raises ProtocolError on a missing, mixed or repeated bucket, a tensor sent twice, or row
    chunks that overlap, leave gaps or disagree in dtype or trailing shape."""
    import torch

    if not buckets:
        raise ProtocolError("no weight buckets")
    version, count = buckets[0].version, buckets[0].num_buckets
    indices = sorted(b.index for b in buckets)
    if any(b.version != version or b.num_buckets != count for b in buckets) or indices != list(range(count)):
        raise ProtocolError(
            f"inconsistent buckets: versions {sorted({b.version for b in buckets})}, counts "
            f"{sorted({b.num_buckets for b in buckets})}, indices {indices}"
        )
    whole: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    chunks: dict[str, list[tuple[int, int, np.ndarray]]] = {}
    for bucket in sorted(buckets, key=lambda b: b.index):
        for named in bucket.tensors:
            array = from_ndarray(named.array, what=f"weight {named.name}")
            previous = dtypes.setdefault(named.name, named.array.dtype)
            if previous != named.array.dtype:
                raise ProtocolError(f"weight {named.name}: chunks in dtypes {previous} and {named.array.dtype}")
            if named.total_rows:
                if named.name in whole:
                    raise ProtocolError(f"weights version {version}: tensor {named.name!r} sent whole and in chunks")
                chunks.setdefault(named.name, []).append((named.row_offset, named.total_rows, array))
            elif named.name in whole or named.name in chunks:
                raise ProtocolError(f"weights version {version}: tensor {named.name!r} sent twice")
            else:
                whole[named.name] = array
    for name, parts in chunks.items():
        whole[name] = _stitch(name, parts)
    state: dict[str, torch.Tensor] = {}
    for name, array in whole.items():
        tensor = torch.from_numpy(np.array(array))  # copy: frame buffers are read-only
        state[name] = tensor.view(torch.bfloat16) if dtypes[name] == "bfloat16" else tensor
    return version, state


def _stitch(name: str, parts: list[tuple[int, int, np.ndarray]]) -> np.ndarray:
    parts = sorted(parts, key=lambda p: p[0])
    total = parts[0][1]
    trailing = parts[0][2].shape[1:]
    cursor = 0
    for offset, rows_total, array in parts:
        if rows_total != total or array.shape[1:] != trailing or offset != cursor:
            raise ProtocolError(
                f"weight {name}: chunk at row {offset} (of {rows_total}, shape {array.shape}) does not continue "
                f"row {cursor} of {total} with trailing shape {trailing}"
            )
        cursor += array.shape[0]
    if cursor != total:
        raise ProtocolError(f"weight {name}: chunks cover {cursor} of {total} rows")
    return np.concatenate([array for _, _, array in parts], axis=0)


def read_fs_manifest(directory: str | os.PathLike) -> Optional[FsManifest]:
    """The current manifest of an fs weight directory, or None before the first version is published.
    Raises ProtocolError on a malformed manifest."""
    path = Path(directory) / FS_MANIFEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        manifest = msgspec.json.decode(raw, type=FsManifest)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"{path}: malformed weight manifest: {exc}") from exc
    if manifest.v != FS_FORMAT_VERSION:
        raise ProtocolError(f"{path}: manifest format {manifest.v}, this reader speaks {FS_FORMAT_VERSION}")
    return manifest


def load_fs_weights(directory: str | os.PathLike, have_version: int = -1
                    ) -> Optional[tuple[int, dict[str, "torch.Tensor"]]]:
    """(version, state dict) of the newest version in an fs weight directory when it is newer than
    `have_version`, else None. Raises ProtocolError when the manifest names files that are missing or disagree
    with it (e.g. the version was pruned while reading: call again)."""
    from safetensors.torch import load_file

    manifest = read_fs_manifest(directory)
    if manifest is None or manifest.version <= have_version:
        return None
    folder = Path(directory) / manifest.folder
    state: dict[str, Any] = {}
    try:
        for name in manifest.files:
            for key, tensor in load_file(str(folder / name)).items():
                if key in state:
                    raise ProtocolError(f"{folder}: tensor {key!r} appears in two files")
                state[key] = tensor
    except FileNotFoundError as exc:
        raise ProtocolError(f"weights version {manifest.version} vanished while reading ({exc}); read again") from exc
    if len(state) != manifest.num_tensors:
        raise ProtocolError(f"{folder}: {len(state)} tensors, manifest says {manifest.num_tensors}")
    return manifest.version, state


def write_fs_manifest(directory: str | os.PathLike, manifest: FsManifest) -> None:
    """Replace `manifest.json` atomically (the writer side; readers see the old or the new one, never a mix)."""
    write_atomic(Path(directory) / FS_MANIFEST, msgspec.json.encode(manifest))


__all__ = ["FS_FORMAT_VERSION", "FS_MANIFEST", "FsManifest", "assemble_weight_buckets", "load_fs_weights",
           "read_fs_manifest", "write_fs_manifest"]
