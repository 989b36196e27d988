"""torch.distributed.checkpoint readers that never unpickle arbitrary objects (see safe.py)."""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from frameloom.checkpoint.safe import MetadataUnpickler, UnsafeCheckpointError


class SafeFileSystemReader(FileSystemReader):
    """`FileSystemReader` whose `.metadata` goes through `MetadataUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as fh:
            metadata = MetadataUnpickler(fh).load()
        if not isinstance(metadata, Metadata):
            raise UnsafeCheckpointError(f"{path} is not a DCP metadata file")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """`DefaultLoadPlanner` that reads non-tensor entries with `weights_only=True`."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UnsafeCheckpointError(
                f"DCP entry {read_item.dest_index.fqn} holds more than plain data"
            ) from exc
        # Re-serialize what was read as plain data: the default planner's own (unrestricted) torch.load then
        # only ever sees bytes written here, never the file's.
        clean = io.BytesIO()
        torch.save(obj, clean)
        clean.seek(0)
        super().load_bytes(read_item, clean)
