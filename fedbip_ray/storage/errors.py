"""One-line storage errors: :class:`StorageError` and the cause of a failed operation.

Messages name the location (``Location.describe()``, never credentials) and a short cause;
anything that looks like a credential is removed from text that came from a storage client.
"""

from __future__ import annotations

import os
import re

from fedbip_ray.config import ConfigError

_SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
               "GOOGLE_APPLICATION_CREDENTIALS")
_ACCESS_KEY = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{12,}\b")
_USERINFO = re.compile(r"(\w+://)[^@\s]*@")
# (marker found in the client's message, cause shown to the user), first match wins
_CAUSES: tuple[tuple[str, str], ...] = (
    ("NO_SUCH_BUCKET", "the bucket does not exist"),
    ("NoSuchBucket", "the bucket does not exist"),
    ("INVALID_ACCESS_KEY_ID", "the credentials were rejected"),
    ("InvalidAccessKeyId", "the credentials were rejected"),
    ("SIGNATURE_DOES_NOT_MATCH", "the credentials were rejected"),
    ("SignatureDoesNotMatch", "the credentials were rejected"),
    ("ACCESS_DENIED", "access denied: check the credentials and the bucket policy"),
    ("AccessDenied", "access denied: check the credentials and the bucket policy"),
    ("Timeout was reached", "the endpoint did not answer in time"),
    ("NETWORK_CONNECTION", "the endpoint is unreachable"),
    ("Could not connect", "the endpoint is unreachable"),
    ("Couldn't resolve host", "the endpoint's host name does not resolve"),
    ("PermanentRedirect", "the bucket is in another region (set AWS_REGION)"),
    ("RESOURCE_NOT_FOUND", "the endpoint answered 'not found': is it an S3 endpoint?"),
    ("Unable to load libjvm", "no HDFS client here: libjvm/libhdfs not found"),
    ("libhdfs", "no HDFS client here: libhdfs not found"),
)


class StorageError(ConfigError):
    """A storage location cannot be used; ``str(err)`` is one line naming it and the cause."""


def scrub(text: str) -> str:
    """``text`` without credentials: env secret values, access key ids, URI user info."""
    for name in _SECRET_ENV:
        value = os.environ.get(name, "")
        if len(value) >= 4:
            text = text.replace(value, "***")
    text = _ACCESS_KEY.sub("***", text)
    return _USERINFO.sub(r"\1***@", text)


def cause(exc: BaseException) -> str:
    """A short, credential-free reason for ``exc`` (one line)."""
    text = str(exc)
    for marker, reason in _CAUSES:
        if marker in text:
            return reason
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, FileNotFoundError):
        return "not found"
    if isinstance(exc, IsADirectoryError | NotADirectoryError):
        return "a file is in the way of a directory (or the reverse)"
    first = scrub(text.strip().splitlines()[0] if text.strip() else type(exc).__name__)
    return first[:200]


def storage_error(where: str, what: str, exc: BaseException) -> StorageError:
    """``StorageError("<where>: <what> (<cause>)")``."""
    return StorageError(f"{where}: {what} ({cause(exc)})")


def safe_uri(text: str) -> str:
    """``text`` as a URI with user info, a non-numeric port and the query replaced by ``***``."""
    if "://" not in text:
        return scrub(text)
    scheme, _, rest = text.partition("://")
    if "@" in rest:  # a secret may hold '/', '?' or '#': drop everything before the last '@'
        rest = "***@" + rest.rpartition("@")[2]
    rest = rest.split("#", 1)[0]
    rest, query, _ = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    host, colon, port = netloc.partition(":")
    if colon and not port.isdigit():
        netloc = f"{host}:***"
    return scrub(f"{scheme}://{netloc}{slash}{path}" + ("?***" if query else ""))
