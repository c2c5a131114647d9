"""Object-storage URIs and options, shared by every part that touches storage.

Users give one flat mapping of storage options, spelled as Delta Lake / object_store spell
them (``aws_access_key_id``, ``aws_secret_access_key``, ``aws_session_token``, ``aws_region``,
``aws_endpoint_url``, ``aws_allow_http``, ``aws_conditional_put``, ...). When they give none,
every library falls back to the standard AWS chain (environment, profile, instance role).
This module translates that mapping for fsspec/s3fs, deltalake and DuckDB, and redacts
secrets from anything that may reach a log, a table or an exception.
"""

from __future__ import annotations

import errno
import functools
import os
import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

SECRET_KEYS = ("aws_secret_access_key", "aws_session_token", "secret", "token", "password")

# Keys whose values must never appear in logs, tables or exceptions.
_SECRET_RE = re.compile(
    r"(?i)((?:aws_)?(?:secret(?:_access)?_key|session_token|secret|token|password)"
    r"[\"']?\s*[:=]\s*[\"']?)([^\s,\"'}&]+)"
)


def is_remote(uri: str) -> bool:
    """True for URIs with a scheme other than ``file://`` (s3://, gs://, https://, ...)."""
    scheme = urlsplit(str(uri)).scheme
    return len(scheme) > 1 and scheme != "file"


def strip_file_scheme(uri: str) -> str:
    return uri[len("file://") :] if str(uri).startswith("file://") else str(uri)


def redact(text: Any) -> str:
    """Remove credentials from a URI or message: userinfo, query secrets, key=value secrets."""
    text = str(text)

    def _clean_uri(match: re.Match) -> str:
        parts = urlsplit(match.group(0))
        netloc = parts.netloc
        if "@" in netloc:
            netloc = "***@" + netloc.rsplit("@", 1)[1]
        # Signing parameters of presigned S3 (v4 and v2), GCS and Azure SAS URLs.
        query = re.sub(
            r"(?i)(^|&)(X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|Signature|"
            r"AWSAccessKeyId|X-Goog-Signature|X-Goog-Credential|sig|token)=[^&]*",
            r"\1\2=***",
            parts.query,
        )
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))

    text = re.sub(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"]+", _clean_uri, text)
    return _SECRET_RE.sub(r"\1***", text)


_STORE_HINTS = (  # first match wins: missing credentials also show up as "forbidden"
    (("nosuchbucket",), "the bucket does not exist"),
    (("169.254.169.254", "imds", "failed to load credentials", "no credentials"),
     ("no credentials found (only the instance metadata service was left to ask): give "
      "them as storage options or AWS_* environment variables")),
    (("connection refused", "tcp connect error", "dns error", "failed to lookup address",
      "name or service not known", "endpointconnectionerror", "could not connect"),
     "cannot connect to the store: check aws_endpoint_url / AWS_ENDPOINT_URL and the network"),
    (("invalidaccesskeyid", "signaturedoesnotmatch", "accessdenied", "403 forbidden",
      "status code: 403", "forbidden"),
     "access denied: check the credentials and the bucket policy"),
    (("timed out", "timeout"), "the store did not answer in time"),
)


def describe_store_error(exc: BaseException) -> str:
    """One line for an object-store error (deltalake's and s3fs's run to many lines of
    nested causes and XML): what to check, then the first line of the original."""
    text = redact(exc)
    first = next((re.sub(r"\x1b\[[0-9;]*m", "", ln).strip(" ↳") for ln in text.splitlines()
                  if ln.strip()), type(exc).__name__)
    low = text.lower()
    for needles, hint in _STORE_HINTS:
        if any(n in low for n in needles):
            return f"{hint} ({first[:160]})"
    return first[:300]


_TRANSIENT = ("connection reset", "reset by peer", "broken pipe", "connection closed",
              "incomplete", "timed out", "timeout", "slowdown", "service unavailable",
              "internal error", "internalerror", " 500", " 502", " 503", " 504",
              "error sending request", "unexpected eof", "connection aborted")


def is_transient(exc: BaseException) -> bool:
    """An object-store error worth retrying: resets, timeouts, throttling, 5xx. Missing
    buckets, refused credentials and bad endpoints are not (retrying cannot fix them)."""
    low = str(exc).lower()
    if any(n in low for n in ("nosuchbucket", "accessdenied", "invalidaccesskeyid",
                              "connection refused", "dns error")):
        return False
    return any(n in low for n in _TRANSIENT)


#: What went wrong on the wire, by errno or words anywhere in an exception's chain; first
#: match wins. botocore's EndpointConnectionError says "Could not connect to the endpoint URL"
#: whatever happened (a reset too): the original is in its ``kwargs["error"]``.
_NETWORK_CAUSES = (
    ("connection reset", (errno.ECONNRESET,), ("reset by peer", "connection reset")),
    ("connection refused", (errno.ECONNREFUSED,), ("connection refused", "connect call failed")),
    ("timed out", (errno.ETIMEDOUT,), ("timed out", "timeout")),
    ("connection closed early", (errno.EPIPE,),
     ("server disconnected", "connection closed", "payload is not completed", "broken pipe")),
)


def _exception_chain(exc: BaseException, limit: int = 16) -> list[BaseException]:
    """``exc``, what it wraps (botocore's ``kwargs["error"]``), its causes and contexts."""
    out: list[BaseException] = []
    todo = [exc]
    while todo and len(out) < limit:
        e = todo.pop(0)
        if e is None or any(e is o for o in out):
            continue
        out.append(e)
        inner = (getattr(e, "kwargs", None) or {}).get("error") \
            if isinstance(getattr(e, "kwargs", None), dict) else None
        todo += [x for x in (inner, e.__cause__, e.__context__) if isinstance(x, BaseException)]
    return out


def network_cause(exc: BaseException) -> str | None:
    """"connection reset", "connection refused", "timed out" or "connection closed early"
    when ``exc`` (or what it wraps) is one of those network failures, else None."""
    chain = _exception_chain(exc)
    for cause, errnos, words in _NETWORK_CAUSES:
        for e in chain:
            if (isinstance(e, OSError) and e.errno in errnos) or \
                    any(w in str(e).lower() for w in words):
                return cause
    return None


def client_attempts(fs: Any) -> int | None:
    """How many times the S3 client of an s3fs filesystem sends a request before it gives up
    (botocore's retry configuration: legacy mode 5, standard and adaptive 3, unless set);
    None for other filesystems or an unknown configuration."""
    config = getattr(getattr(getattr(fs, "s3", None), "meta", None), "config", None)
    retries = getattr(config, "retries", None)
    if not isinstance(retries, dict):
        return None
    if retries.get("total_max_attempts"):
        return int(retries["total_max_attempts"])
    if retries.get("max_attempts") is not None:  # retries after the first attempt
        return int(retries["max_attempts"]) + 1
    return {"legacy": 5, "standard": 3, "adaptive": 3}.get(retries.get("mode", "legacy"))


def network_failure(exc: BaseException, uri: str, fs: Any, doing: str) -> str | None:
    """One line for a network failure while ``doing`` (e.g. "reading") ``uri`` through
    ``fs``: what happened, the URI (redacted) and the client's attempts, e.g. "connection
    reset while reading s3://bucket/key after 5 attempts"; None when ``exc`` is not one."""
    cause = network_cause(exc)
    if cause is None:
        return None
    attempts = client_attempts(fs)
    tail = f" after {attempts} attempts" if attempts else ""
    hint = (": check aws_endpoint_url / AWS_ENDPOINT_URL and the network"
            if cause == "connection refused" else "")
    return f"{cause} while {doing} {redact(uri)}{tail}{hint}"


def store_error(what: str, exc: BaseException) -> Any:
    """A one-line :class:`StorageError` for an object-store error on ``what`` (a table or
    file named with its redacted URI); ``.transient`` says whether retrying may help."""
    from care_scale.exceptions import StorageError

    err = StorageError(f"{what}: {describe_store_error(exc)}")
    err.transient = (exc.transient if isinstance(exc, StorageError)
                     else is_transient(exc))
    return err


def check_no_userinfo(uri: str, what: str) -> None:
    """Refuse ``scheme://user:secret@host/...``: a URI is stored (runs, slides, failures) and
    printed (ours and botocore's), so credentials must come as storage options or from the
    AWS environment instead. Presigned URLs keep their signature (it is needed to read them);
    it is redacted wherever the URI is stored or shown."""
    parts = urlsplit(str(uri))
    if parts.scheme and "@" in parts.netloc:
        from care_scale.exceptions import ConfigError

        raise ConfigError(f"{what} {redact(uri)} has credentials in it (user:...@): give them "
                          "as --storage-option KEY=VALUE or AWS_* environment variables")


def redact_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of storage options that can be logged or stored in the runs table."""
    out = {}
    for k, v in (options or {}).items():
        key = str(k).lower()
        out[k] = "***" if any(s in key for s in ("secret", "token", "password")) else v
    return out


def _opt(options: dict[str, Any], *names: str) -> Any:
    for name in names:
        for k, v in options.items():
            if str(k).lower() == name:
                return v
    return None


def to_fsspec(options: dict[str, Any] | None, uri: str | None = None) -> dict[str, Any]:
    """Keyword arguments for ``fsspec.filesystem``/``fsspec.open`` (s3fs for s3:// URIs)."""
    options = dict(options or {})
    if not options:
        return {}
    scheme = urlsplit(uri).scheme if uri else "s3"
    if scheme not in ("s3", "s3a"):
        # Other filesystems take their own keyword names; pass through what is not AWS-specific.
        return {k: v for k, v in options.items() if not str(k).lower().startswith("aws_")}
    kwargs: dict[str, Any] = {}
    if (v := _opt(options, "aws_access_key_id", "key")) is not None:
        kwargs["key"] = v
    if (v := _opt(options, "aws_secret_access_key", "secret")) is not None:
        kwargs["secret"] = v
    if (v := _opt(options, "aws_session_token", "token")) is not None:
        kwargs["token"] = v
    client_kwargs: dict[str, Any] = {}
    if (v := _opt(options, "aws_endpoint_url", "aws_endpoint", "endpoint_url")) is not None:
        client_kwargs["endpoint_url"] = v
    if (v := _opt(options, "aws_region", "region_name")) is not None:
        client_kwargs["region_name"] = v
    if client_kwargs:
        kwargs["client_kwargs"] = client_kwargs
    if str(_opt(options, "aws_skip_signature") or "").lower() == "true":
        kwargs["anon"] = True
    return kwargs


#: botocore credential providers whose keys come from the AWS shared credentials/config file
#: (static keys, ``credential_process``, ``role_arn`` assume-role, SSO): object_store cannot
#: read those files, so we hand their keys on. The rest (``env``, web identity, container and
#: instance roles) object_store resolves and refreshes itself.
_FILE_METHODS = ("shared-credentials-file", "config-file", "custom-process", "assume-role",
                 "sso")


@functools.lru_cache(maxsize=8)
def _file_credentials(profile: str | None, files: tuple[str | None, str | None],
                      stamps: tuple[float | None, ...]) -> tuple[Any, str | None]:
    """botocore's credentials object for the profile and its region, or (None, None) when
    the chain finds them elsewhere. Cached per profile, file paths and the files'
    modification times (``stamps``), so a rewritten file is read again."""
    import botocore.session

    session = botocore.session.Session(profile=profile)
    creds = session.get_credentials()
    if creds is None or creds.method not in _FILE_METHODS:
        return None, None
    return creds, session.get_config_variable("region")


def _stamp(path: str) -> float | None:
    try:
        return os.stat(os.path.expanduser(path)).st_mtime
    except OSError:
        return None


def shared_file_credentials() -> dict[str, str]:
    """What the AWS shared credentials/config file gives for this process's profile (profile
    ``AWS_PROFILE``, files ``AWS_SHARED_CREDENTIALS_FILE`` / ``AWS_CONFIG_FILE``).

    s3fs (botocore) reads those files; deltalake's object_store does not (it goes on to the
    instance metadata service and fails). Handing deltalake the same keys makes the slides
    and the warehouse see one credential chain: explicit options, then ``AWS_*`` variables
    (object_store reads them), then these files, then roles (object_store again).

    Temporary credentials stay fresh: the keys are taken anew on every call (every table
    open), from a file rewritten since the last call (``aws sso login``, a refresher) or from
    botocore's refreshable credentials (``credential_process``, assume-role, SSO), which
    botocore renews before they expire."""
    creds_file = os.environ.get("AWS_SHARED_CREDENTIALS_FILE")
    config_file = os.environ.get("AWS_CONFIG_FILE")
    stamps = tuple(_stamp(p) for p in (creds_file or "~/.aws/credentials",
                                       config_file or "~/.aws/config"))
    try:
        creds, region = _file_credentials(os.environ.get("AWS_PROFILE") or None,
                                          (creds_file, config_file), stamps)
    except ImportError:  # botocore comes with s3fs; without it there is no S3 anyway
        return {}
    if creds is None:
        return {}
    frozen = creds.get_frozen_credentials()  # refreshes refreshable credentials near expiry
    out = {"aws_access_key_id": frozen.access_key, "aws_secret_access_key": frozen.secret_key}
    if frozen.token:
        out["aws_session_token"] = frozen.token
    if region:
        out["aws_region"] = region
    return out


def to_delta(options: dict[str, Any] | None, uri: str | None = None) -> dict[str, str]:
    """``storage_options`` for ``deltalake`` (object_store keys, all values as strings).

    On S3, deltalake commits with conditional PUT. S3-compatible servers (MinIO, moto, Ceph)
    need ``aws_conditional_put: etag``; we set it whenever a custom endpoint is used and the
    user did not choose otherwise. Keys that only the AWS shared credentials file holds are
    added (:func:`shared_file_credentials`).
    """
    out = {str(k).lower(): str(v) for k, v in (options or {}).items() if v is not None}
    for src, dst in (("key", "aws_access_key_id"), ("secret", "aws_secret_access_key"),
                     ("token", "aws_session_token"), ("endpoint_url", "aws_endpoint_url"),
                     ("region_name", "aws_region")):
        if src in out and dst not in out:
            out[dst] = out.pop(src)
    s3 = uri is not None and urlsplit(uri).scheme in ("s3", "s3a")
    if (s3 and "aws_access_key_id" not in out and not os.environ.get("AWS_ACCESS_KEY_ID")
            and str(out.get("aws_skip_signature", "")).lower() != "true"):
        shared = shared_file_credentials()
        if "aws_region" in out or os.environ.get("AWS_REGION") or os.environ.get(
                "AWS_DEFAULT_REGION"):
            shared.pop("aws_region", None)
        out.update(shared)
    endpoint = out.get("aws_endpoint_url") or os.environ.get("AWS_ENDPOINT_URL")
    if s3 and endpoint:
        out.setdefault("aws_conditional_put", "etag")
        if endpoint.startswith("http://"):
            out.setdefault("aws_allow_http", "true")
    return out


def url_to_fs(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """The fsspec filesystem and path of ``uri`` (local path, ``file://`` or a remote URI),
    with the user's storage options translated for it."""
    import fsspec

    uri = strip_file_scheme(str(uri))
    return fsspec.core.url_to_fs(uri, **to_fsspec(storage_options, uri))


def join(base: str, *parts: str) -> str:
    """Join URI/path segments with ``/`` (works for local paths and fsspec URIs)."""
    out = str(base).rstrip("/")
    for p in parts:
        out = f"{out}/{str(p).strip('/')}"
    return out


def write_text(uri: str | os.PathLike, text: str,
               storage_options: dict[str, Any] | None = None) -> None:
    """Replace the file at ``uri`` with ``text`` all at once (see :func:`write_bytes`)."""
    write_bytes(uri, text.encode(), storage_options)


def write_bytes(uri: str | os.PathLike, data: bytes,
                storage_options: dict[str, Any] | None = None) -> None:
    """Replace the file at ``uri`` with ``data`` all at once, local or remote.

    Local: written beside, then renamed, so a process killed mid-write (SIGKILL, node loss)
    never leaves a truncated file; readers see the old content or the new. Object stores: one
    PUT replaces the whole object, which is already all-or-nothing.
    """
    uri = str(uri)
    if is_remote(uri):
        import fsspec

        with fsspec.open(uri, "wb", **to_fsspec(storage_options, uri)) as fh:
            fh.write(data)
        return
    path = strip_file_scheme(uri)
    tmp = f"{path}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
