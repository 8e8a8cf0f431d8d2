"""Small shared utilities (atomic writes, hashing)."""

from tbps.utils.io import atomic_write, atomic_write_bytes, sha256_file

__all__ = ["atomic_write", "atomic_write_bytes", "sha256_file"]
