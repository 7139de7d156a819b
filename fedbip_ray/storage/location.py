"""A :class:`Location`: a local directory or a storage URI (pyarrow.fs) behind one small API.

``open_location`` accepts a local path, ``file://``, ``s3://bucket/prefix``, ``gs://bucket/prefix``
and ``hdfs://host[:port]/path``. Credentials always come from the provider's standard chain
(for S3: environment, profile, instance role); the S3 endpoint may be overridden with the
standard ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` variables. A URI holding credentials is
refused, so none is ever stored, pickled or printed.
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote, urlsplit

import pyarrow.fs as pafs

from fedbip_ray.storage.errors import StorageError, safe_uri, storage_error

CONNECT_TIMEOUT_S = 5.0  # seconds to open a connection to an object store
REQUEST_TIMEOUT_S = 30.0  # seconds a request may go without receiving data
MAX_ATTEMPTS = 3  # tries per request (the first included)
SCHEMES = ("file", "s3", "gs", "gcs", "hdfs")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")


@dataclass(frozen=True)
class Location:
    """A file or directory: ``filesystem`` + ``path`` (absolute, or ``bucket/key``) + ``uri``.

    ``uri`` is what the user gave (local) or ``scheme://bucket/key`` (remote), credential-free;
    ``endpoint`` is the non-default endpoint, shown in error messages.
    """

    filesystem: pafs.FileSystem = field(repr=False, compare=False)
    path: str
    uri: str
    endpoint: str | None = field(default=None, compare=False)

    # ------------------------------------------------------------------ naming
    @property
    def is_local(self) -> bool:
        """True for a local directory (plain path or ``file://``)."""
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    @property
    def local_path(self) -> Path:
        """The local path of a local location (``ValueError`` for a remote one)."""
        if not self.is_local:
            raise ValueError(f"{self.uri} is not a local path")
        return Path(self.path)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    def __truediv__(self, name: str) -> Location:
        parts = [p for p in str(name).split("/") if p]
        if not parts or any(p in (".", "..") for p in parts):
            raise ValueError(f"invalid child name {name!r}")
        child = "/".join(parts)
        return replace(self, path=posixpath.join(self.path, child),
                       uri=self.uri.rstrip("/") + "/" + child)

    def describe(self) -> str:
        """The location as a URI or path, without credentials."""
        return self.uri

    def __str__(self) -> str:
        return self.uri

    # ------------------------------------------------------------------ reading
    def read_bytes(self) -> bytes:
        """The whole object; ``FileNotFoundError`` if absent, ``StorageError`` on other failures."""
        try:
            if self.is_local:
                return Path(self.path).read_bytes()
            with self.filesystem.open_input_stream(self.path) as fh:
                return fh.read()
        except FileNotFoundError:
            raise FileNotFoundError(self.uri) from None
        except OSError as exc:
            if self._missing_error(exc):
                raise FileNotFoundError(self.uri) from None
            raise storage_error(self.uri, "cannot read", exc) from None

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def _missing_error(self, exc: OSError) -> bool:
        return not self.is_local and "Path does not exist" in str(exc)

    def exists(self) -> bool:
        """Whether a file or a non-empty directory is here."""
        return self.info().type != pafs.FileType.NotFound

    def info(self) -> pafs.FileInfo:
        try:
            return self.filesystem.get_file_info(self.path)
        except OSError as exc:
            raise storage_error(self.uri, "cannot stat", exc) from None

    def listdir(self) -> list[str]:
        """Names of the direct children, sorted (empty if the directory is absent)."""
        try:
            if self.is_local:
                return sorted(os.listdir(self.path)) if os.path.isdir(self.path) else []
            found = self.filesystem.get_file_info(pafs.FileSelector(self.path,
                                                                    allow_not_found=True))
        except OSError as exc:
            raise storage_error(self.uri, "cannot list", exc) from None
        return sorted(posixpath.basename(i.path.rstrip("/")) for i in found)

    # ------------------------------------------------------------------ writing
    @contextmanager
    def open_writer(self) -> Iterator[BinaryIO]:
        """A binary stream whose content replaces this file when the block ends without error.

        Local: a temporary file, fsynced and renamed into place; a failed block leaves the old
        file. Object store: one upload that becomes visible on close; pyarrow cannot abort an
        upload, so a failed block deletes the key (an older object there is gone too): stream
        into fresh keys (as :func:`publish_checkpoint` does) and use ``write_bytes`` to replace.
        """
        if self.is_local:
            with _local_writer(Path(self.path), self.uri) as fh:
                yield fh
            return
        try:
            stream = self.filesystem.open_output_stream(self.path)
        except OSError as exc:
            raise storage_error(self.uri, "cannot write", exc) from None
        try:
            yield stream  # type: ignore[misc]
        except BaseException as exc:
            _close_quietly(stream)  # completes the upload: delete what it published
            self.delete(quiet=True)
            if isinstance(exc, OSError) and not isinstance(exc, StorageError):
                raise storage_error(self.uri, "cannot write", exc) from None
            raise
        try:
            stream.close()
        except OSError as exc:  # the upload did not complete: nothing to delete
            raise storage_error(self.uri, "cannot write", exc) from None

    def write_bytes(self, data: bytes | bytearray | memoryview) -> None:
        """Replace this file with ``data`` all at once (readers see the old or the new bytes)."""
        with self.open_writer() as fh:
            fh.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def mkdir(self) -> None:
        """Create this directory locally (object stores have none; nothing to do there)."""
        if self.is_local:
            try:
                Path(self.path).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise storage_error(self.uri, "cannot create the directory", exc) from None

    def delete(self, quiet: bool = False) -> None:
        """Remove this file if present (``quiet``: ignore every failure)."""
        try:
            if self.is_local:
                Path(self.path).unlink(missing_ok=True)
            else:
                self.filesystem.delete_file(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if not (quiet or self._missing_error(exc)):
                raise storage_error(self.uri, "cannot delete", exc) from None

    def delete_dir(self) -> None:
        """Remove this directory and everything under it, if present."""
        try:
            if self.is_local:
                if os.path.isdir(self.path):
                    shutil.rmtree(self.path)
            elif self.info().type == pafs.FileType.Directory:
                self.filesystem.delete_dir(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise storage_error(self.uri, "cannot delete", exc) from None


# ---------------------------------------------------------------------- local helpers
def fsync_dir(path: Path) -> None:
    """Make a rename or creation inside ``path`` durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def _local_writer(path: Path, uri: str) -> Iterator[BinaryIO]:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = tmp.open("wb")
    except OSError as exc:
        raise storage_error(uri, "cannot write", exc) from None
    try:
        with fh:
            yield fh  # type: ignore[misc]
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, StorageError):
            raise storage_error(uri, "cannot write", exc) from None
        raise
    fsync_dir(path.parent)


def _close_quietly(stream: Any) -> None:
    try:
        stream.close()
    except OSError:
        pass


# ---------------------------------------------------------------------- opening
def open_location(target: str | os.PathLike[str] | Location) -> Location:
    """The :class:`Location` for a local path or a URI; ``StorageError`` (one line) if unusable.

    Nothing is contacted here except where the client library connects on creation (HDFS);
    call :func:`fedbip_ray.storage.probe` to check that the location can be written.
    """
    if isinstance(target, Location):
        return target
    text = os.fspath(target)
    if not text.strip():
        raise StorageError("output location is empty")
    if "://" not in text:
        return _local(text, text)
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise StorageError(f"{safe_uri(text)}: unsupported storage scheme '{scheme}' "
                           "(use a local path, file://, s3://, gs:// or hdfs://)")
    if _has_credentials(scheme, text.partition("://")[2].partition("/")[0]):
        raise StorageError(f"{safe_uri(text)}: credentials in the URI are not accepted; use the "
                           "provider's standard credential chain (environment, profile, role)")
    if parts.query or parts.fragment:
        raise StorageError(f"{safe_uri(text)}: query options are not accepted "
                           "(the S3 endpoint comes "
                           "from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)")
    if scheme == "file":
        return _file_uri(text, parts.netloc, parts.path)
    if scheme == "hdfs":
        return _hdfs(text, parts.hostname or "", parts.port, parts.username, parts.path)
    return _bucket(text, scheme, parts.netloc, parts.path)


def _has_credentials(scheme: str, authority: str) -> bool:
    """Whether the part before the first '/' holds user info with a secret (HDFS: a bare user
    name is allowed; buckets never hold '@' or ':')."""
    if scheme == "hdfs":
        return "@" in authority and ":" in authority.rpartition("@")[0]
    return scheme != "file" and ("@" in authority or ":" in authority)


def _local(given: str, path: str) -> Location:
    return Location(pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path)), given)


def _file_uri(text: str, netloc: str, path: str) -> Location:
    if netloc not in ("", "localhost") or not path.startswith("/"):
        raise StorageError(f"{safe_uri(text)}: a file:// URI needs an absolute local path (file:///dir)")
    return _local(text, unquote(path))


def _bucket(text: str, scheme: str, bucket: str, key: str) -> Location:
    if not _BUCKET.match(bucket):
        raise StorageError(f"{safe_uri(text)}: '{bucket}' is not a valid bucket name (at least 3 "
                           "characters: lowercase letters, digits, '.', '-', '_')")
    key = "/".join(p for p in unquote(key).split("/") if p)
    path = f"{bucket}/{key}" if key else bucket
    if scheme == "s3":
        filesystem, endpoint = s3_filesystem(bucket)
    else:
        filesystem, endpoint = pafs.GcsFileSystem(
            retry_time_limit=timedelta(seconds=REQUEST_TIMEOUT_S)), None
    return Location(filesystem, path, f"{scheme}://{path}", endpoint)


PROVIDER_ENV_PREFIXES = ("AWS_", "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT",
                         "HADOOP_", "ARROW_LIBHDFS_DIR", "MLFLOW_S3_ENDPOINT_URL")


def provider_env() -> dict[str, str]:
    """This process's storage-provider variables (credentials, endpoints, regions), to hand
    to a worker that opens the same locations elsewhere (never to logs or configs)."""
    return {k: v for k, v in os.environ.items() if k.startswith(PROVIDER_ENV_PREFIXES)}


def s3_endpoint() -> str | None:
    """The S3 endpoint override from the standard AWS variables (service-specific first)."""
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def s3_filesystem(bucket: str, request_timeout_s: float = REQUEST_TIMEOUT_S,
                  max_attempts: int = MAX_ATTEMPTS) -> tuple[pafs.S3FileSystem, str | None]:
    """An S3 client with short timeouts and bounded retries, credentials from the AWS chain;
    the endpoint it uses (None: AWS's own)."""
    endpoint = s3_endpoint()
    kwargs: dict[str, Any] = dict(
        connect_timeout=CONNECT_TIMEOUT_S, request_timeout=request_timeout_s,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts),
        allow_delayed_open=True)
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs.update(endpoint_override=parts.netloc.rpartition("@")[2], scheme=parts.scheme)
        endpoint = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"
    elif not region:
        try:
            region = pafs.resolve_s3_region(bucket)
        except (OSError, ValueError):
            region = None  # the probe reports what is wrong
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs), endpoint


def _hdfs(text: str, host: str, port: int | None, user: str | None, path: str) -> Location:
    if not host:
        raise StorageError(f"{safe_uri(text)}: an hdfs:// URI needs a name node (hdfs://host:port/path)")
    try:
        filesystem = pafs.HadoopFileSystem(host, port or 8020, user=user)
    except OSError as exc:
        raise storage_error(safe_uri(text), "cannot connect to HDFS", exc) from None
    netloc = f"{host}:{port}" if port else host
    return Location(filesystem, "/" + path.strip("/"), f"hdfs://{netloc}/{path.strip('/')}")
