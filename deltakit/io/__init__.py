"""Checkpoint I/O: lazy reads, streaming sharded writes, atomic outputs, PEFT adapter files."""

from deltakit.io.atomic import atomic_directory, atomic_file, check_output_path
from deltakit.io.checkpoint import Checkpoint, open_checkpoint
from deltakit.io.hub import resolve_path
from deltakit.io.tensor_info import TensorInfo
from deltakit.io.writer import DEFAULT_SHARD_BYTES, ShardedWriter

__all__ = [
    "Checkpoint", "TensorInfo", "open_checkpoint", "resolve_path",
    "ShardedWriter", "DEFAULT_SHARD_BYTES", "atomic_directory", "atomic_file", "check_output_path",
]
