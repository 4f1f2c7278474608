"""Writing output shards as tensors arrive, and publishing the output folder atomically.

[`StreamingShardWriter`] is given the full list of output tensors (names, shapes, dtypes) up front, so it can lay out
every shard and write every safetensors header before any data exists; each tensor is then written at its offset
the moment it is produced and dropped, so memory never holds more than the tensors being converted.

[`atomic_output_folder`] writes into a temporary folder beside the output and renames it at the end; on any error
(or interruption) the temporary folder is removed and no output folder appears.
"""

from __future__ import annotations

import math
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from modeling_looped_moe.conversion.families import ConversionError

SAFETENSORS_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "tokenizer.model", "spiece.model", "vocab.txt", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: its full name, shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Size in bytes."""
        return math.prod(self.shape) * self.dtype.itemsize


def parse_size(size: str | int) -> int:
    """Parses `"2GB"`, `"500MB"`, `"10KB"` or a byte count."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for suffix, factor in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6),
                           ("KB", 10**3), ("B", 1)):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(text)


def assign_shards(plan: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Splits the plan, in order, into shards of at most `max_shard_bytes` (a larger single tensor gets its own)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for tensor in plan:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


class StreamingShardWriter:
    """Writes a planned set of tensors into safetensors shards, in any order, one tensor at a time.

    Within a shard, tensors are laid out by decreasing item size (then name), so every tensor stays aligned to its
    item size, as the safetensors library does.

    Args:
        folder: Where the shards go.
        plan: Every tensor that will be written.
        max_shard_bytes: Shard size limit; one shard is written as `model.safetensors` without an index.
    """

    def __init__(self, folder: Path, plan: list[PlannedTensor], max_shard_bytes: int):
        self.folder = Path(folder)
        shards = assign_shards(plan, max_shard_bytes)
        count = len(shards)
        self.files = ["model.safetensors"] if count == 1 else \
            [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        self.locations: dict[str, tuple[int, int, PlannedTensor]] = {}  # name -> (shard, absolute offset, plan)
        self.total_bytes = sum(t.nbytes for t in plan)
        self.weight_map: dict[str, str] = {}
        self._handles = []
        for shard_idx, tensors in enumerate(shards):
            ordered = sorted(tensors, key=lambda t: (-t.dtype.itemsize, t.name))
            header: dict[str, object] = {"__metadata__": {"format": "pt"}}
            offset = 0
            for tensor in ordered:
                header[tensor.name] = {"dtype": SAFETENSORS_NAMES[tensor.dtype], "shape": list(tensor.shape),
                                       "data_offsets": [offset, offset + tensor.nbytes]}
                offset += tensor.nbytes
            header_bytes = json.dumps(header, separators=(",", ":")).encode()
            header_bytes += b" " * (-len(header_bytes) % 8)
            data_start = 8 + len(header_bytes)
            handle = open(self.folder / self.files[shard_idx], "wb")
            handle.write(len(header_bytes).to_bytes(8, "little"))
            handle.write(header_bytes)
            handle.truncate(data_start + offset)
            self._handles.append(handle)
            for tensor in ordered:
                start = header[tensor.name]["data_offsets"][0]  # type: ignore[index]
                self.locations[tensor.name] = (shard_idx, data_start + start, tensor)
                self.weight_map[tensor.name] = self.files[shard_idx]
        self._written: set[str] = set()
        self._part_bytes: dict[str, int] = {}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Writes one planned tensor (its shape and dtype must match the plan)."""
        if name not in self.locations:
            raise ConversionError(f"internal error: tensor {name} was not planned")
        shard_idx, offset, planned = self.locations[name]
        if tuple(tensor.shape) != planned.shape or tensor.dtype != planned.dtype:
            raise ConversionError(f"internal error: {name} is {tuple(tensor.shape)} {tensor.dtype}, planned "
                                  f"{planned.shape} {planned.dtype}")
        if name in self._written:
            raise ConversionError(f"internal error: tensor {name} written twice")
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        handle = self._handles[shard_idx]
        handle.seek(offset)
        handle.write(memoryview(data))
        self._written.add(name)

    def write_part(self, name: str, element_offset: int, tensor: torch.Tensor) -> None:
        """Writes `tensor` into planned tensor `name` starting at flat element `element_offset` (for filling a fused
        tensor piece by piece); the pieces must cover the tensor exactly once."""
        shard_idx, offset, planned = self.locations[name]
        if tensor.dtype != planned.dtype or element_offset < 0 or \
                (element_offset + tensor.numel()) * planned.dtype.itemsize > planned.nbytes:
            raise ConversionError(f"internal error: a {tuple(tensor.shape)} {tensor.dtype} piece at element "
                                  f"{element_offset} does not fit {name} {planned.shape} {planned.dtype}")
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        handle = self._handles[shard_idx]
        handle.seek(offset + element_offset * planned.dtype.itemsize)
        handle.write(memoryview(data))
        self._part_bytes[name] = self._part_bytes.get(name, 0) + data.nbytes
        if self._part_bytes[name] == planned.nbytes:
            self._written.add(name)

    def close(self) -> None:
        """Closes the shards, checks that every planned tensor was written and writes the index when sharded."""
        for handle in self._handles:
            handle.close()
        self._handles = []
        missing = sorted(set(self.locations) - self._written)
        if missing:
            raise ConversionError(f"internal error: {len(missing)} planned tensors were not written, e.g. {missing[0]}")
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(self.weight_map.items()))}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        """Closes open files without checks (the temporary folder is removed by the caller)."""
        for handle in self._handles:
            handle.close()
        self._handles = []


def copy_tokenizer_files(source: Path, destination: Path) -> list[str]:
    """Copies tokenizer files (and `generation_config.json`) that exist in `source`; returns their names."""
    copied = []
    names = set(TOKENIZER_FILES) | {p.name for p in source.glob("tokenizer*") if p.is_file()}
    for name in sorted(names):
        if (source / name).is_file():
            shutil.copy2(source / name, destination / name)
            copied.append(name)
    return copied


def check_output_path(output: Path, overwrite: bool) -> None:
    """Refuses an existing output without `overwrite`, and an output that is not a folder.

    Raises:
        ConversionError: The output exists and may not be replaced.
    """
    if output.exists() or output.is_symlink():
        if not overwrite:
            raise ConversionError(f"output {output} already exists (use --overwrite to replace it)")
        if not output.is_dir():
            raise ConversionError(f"output {output} exists and is not a folder")


@contextmanager
def atomic_output_folder(output: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary folder beside `output` that becomes `output` only if the block finishes.

    Args:
        output: The final folder.
        overwrite: Replace an existing `output` (it is removed only after the new folder is complete).

    Raises:
        ConversionError: The output exists and `overwrite` is false.
    """
    output = Path(output).absolute()
    check_output_path(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o777 & ~umask)  # mkdtemp makes it private; the output gets ordinary permissions
    try:
        yield temporary
        check_output_path(output, overwrite)
        if output.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
            output.rename(trash / "old")
            temporary.rename(output)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            temporary.rename(output)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


__all__ = ["PlannedTensor", "StreamingShardWriter", "assign_shards", "atomic_output_folder", "check_output_path",
           "copy_tokenizer_files", "parse_size"]
