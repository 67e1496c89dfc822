"""Small text files in a run directory that may be local or on shared/cloud storage (whatever pyarrow opens).

Ray Train needs `storage_path` to be reachable from every node (NFS, S3, GCS); these helpers keep the driver's
and the workers' own files (resolved config, MLflow run id, result, fault marker) in the same place.
"""

from __future__ import annotations

import posixpath
from pathlib import Path

import pyarrow.fs


def _resolve(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    if "://" in uri:
        return pyarrow.fs.FileSystem.from_uri(uri)
    return pyarrow.fs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    """Path join that keeps URIs (`s3://bucket/x`) intact."""
    return posixpath.join(base, *parts) if "://" in base else str(Path(base, *parts))


def normalise(storage_path: str | Path) -> str:
    """An absolute local path or an untouched URI."""
    text = str(storage_path)
    return text if "://" in text else str(Path(text).expanduser().resolve())


def read_text(uri: str) -> str | None:
    """The file's text, or None if it does not exist."""
    fs, path = _resolve(uri)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(path) as stream:
        return stream.read().decode()


def write_text(uri: str, text: str) -> None:
    """Write (replace) a small text file, creating its directory."""
    fs, path = _resolve(uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as stream:
        stream.write(text.encode())
