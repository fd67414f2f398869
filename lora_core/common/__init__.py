"""Helpers every layer shares: atomic file/directory writes, checked JSON reads, progress, and
the fetch of pinned files from PyPI wheels (models and data sets alike)."""
from lora_core.common.files import (atomic_directory, atomic_write_bytes, atomic_write_json, atomic_write_text,
                                    atomic_write_via, read_json)
from lora_core.common.progress import progress

__all__ = ["atomic_directory", "atomic_write_bytes", "atomic_write_json", "atomic_write_text",
           "atomic_write_via", "read_json", "progress"]
