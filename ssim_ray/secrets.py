"""Credentials: the one place that knows what a secret looks like, how to refuse it and how to redact it.

Every file the job writes (`_run.json`, markers, part files, `ssim.parquet`, `summary.json`, the report)
and every message it prints passes what came from the user through here:

- `redact_text(text)`: in any string, a URL's `user:password@` becomes `***@`, and the values of query
  parameters that carry credentials (presigned S3 `X-Amz-*`, GCS `X-Goog-*`, Azure SAS `sig`,
  anything named like a token, key, secret, signature, password or credential) become `***`.
- `scrub(value)`: a JSON-like structure with every value under a credential-named key replaced by
  `<redacted>` (at any depth) and every string passed through `redact_text`.
- `reject_credentials(name, options)`: storage options are refused when a key names a credential:
  Hydra saves the composed config and the command line in the run folder before the job starts, so a
  secret must never be accepted there in the first place. Credentials come from the environment or
  fsspec's own configuration.

What counts as a credential-named key is decided once, by `is_secret_key`, for all three.
"""

from __future__ import annotations

import re
from typing import Any, List, Mapping

REDACTED = "<redacted>"
MASK = "***"

# Words that make a mapping key a credential wherever they appear in it ("aws_secret_access_key",
# "sas_token", "Authorization", "connection_string", "client_secret", "private_key_id" ...).
_SECRET_WORDS = (
    "secret", "token", "password", "passwd", "credential", "private", "signature", "session_token",
    "connection_string", "connectionstring", "sas", "authorization", "cookie", "apikey", "api_key",
    "access_key", "account_key",
)
# Whole keys that are credentials on their own (s3fs's key/secret/token; "auth" for http).
_SECRET_KEYS = ("key", "auth", "sig", "pwd", "pass")
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)[^/@\s?#]*@")
# Query parameters of presigned URLs and SAS tokens whose values are credentials.
_SECRET_QUERY = re.compile(
    r"(?P<name>[?&](?:[^=&#\s]*(?:sig|signature|token|credential|secret|password|key)[^=&#\s]*"
    r"|x-amz-[^=&#\s]*|x-goog-[^=&#\s]*)=)[^&#\s]*",
    re.IGNORECASE,
)


def is_secret_key(key: object) -> bool:
    """Whether a mapping key names a credential (its value must never be accepted or written).

    Example:
        >>> [is_secret_key(k) for k in ("secret", "Authorization", "api_key", "endpoint_url", "region_name")]
        [True, True, True, False, False]
    """
    lowered = str(key).lower().replace("-", "_")
    if lowered in _SECRET_KEYS or lowered.endswith(("_key", "key_id")):
        return True
    return any(word in lowered for word in _SECRET_WORDS)


def redact_text(text: str) -> str:
    """`text` with URL user-info and credential query parameters masked; safe for messages and files.

    Args:
        text: a URL, a path, or any message that may contain URLs.

    Returns:
        The text with `user:password@` as `***@` and credential query values as `***`.

    Example:
        >>> redact_text("https://user:secret@host/a.png")
        'https://***@host/a.png'
        >>> redact_text("https://b.s3.amazonaws.com/a.png?X-Amz-Signature=abc&x=1")
        'https://b.s3.amazonaws.com/a.png?X-Amz-Signature=***&x=1'
    """
    return _SECRET_QUERY.sub(lambda m: f"{m.group('name')}{MASK}",
                             _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", text))


def scrub(value: Any) -> Any:
    """A copy of `value` safe to write: credential-named keys redacted, every string through `redact_text`.

    Args:
        value: any JSON-like structure (mappings, lists, tuples, scalars).

    Returns:
        The scrubbed copy (tuples become lists, mapping keys become strings).

    Example:
        >>> scrub({"key": "AKIA", "client_kwargs": {"endpoint_url": "http://u:p@127.0.0.1:9000"}})
        {'key': '<redacted>', 'client_kwargs': {'endpoint_url': 'http://***@127.0.0.1:9000'}}
    """
    if isinstance(value, Mapping):
        return {str(k): REDACTED if is_secret_key(k) and v is not None else scrub(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


def reject_credentials(name: str, options: Any) -> None:
    """Refuse credentials in storage options, at any depth (headers included).

    Args:
        name: the option's path in the config, for the message (e.g. "source.storage_options").
        options: the options as configured.

    Raises:
        ValueError: a key names a credential; the message says where credentials go instead.

    Example:
        >>> reject_credentials("source.storage_options", {"client_kwargs": {"endpoint_url": "http://127.0.0.1"}})
        >>> reject_credentials("source.storage_options", {"headers": {"Authorization": "Bearer x"}})
        Traceback (most recent call last):
        ...
        ValueError: source.storage_options.headers.Authorization: credentials are not accepted in the config (Hydra writes it to disk); set them in the environment (e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) or in fsspec's own configuration
    """
    if not isinstance(options, Mapping):
        return
    for key, value in options.items():
        if is_secret_key(key):
            raise ValueError(
                f"{name}.{key}: credentials are not accepted in the config (Hydra writes it to disk); "
                "set them in the environment (e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) or in "
                "fsspec's own configuration"
            )
        reject_credentials(f"{name}.{key}", value)


def contains_credentials(text: str) -> bool:
    """Whether `text` still holds something `redact_text` would mask (URL user-info or a credential query).

    Example:
        >>> contains_credentials("s3://b/k.png"), contains_credentials("https://h/a?sig=abc")
        (False, True)
    """
    return redact_text(text) != text


def literal_secrets(value: Any, path: str = "") -> List[str]:
    """Where a config tree holds a credential literally: a credential-named key with a value, or a string with
    URL user-info or a credential query parameter. An interpolation (`${oc.env:VAR}`) is not literal: Hydra
    saves it as written, and the value stays in the environment.

    Args:
        value: the config as plain containers, interpolations unresolved.
        path: the dotted path of `value` (for the messages).

    Returns:
        The dotted paths that hold credentials, in tree order.

    Example:
        >>> literal_secrets({"source": {"url": "https://h/m.parquet?X-Amz-Signature=abc",
        ...                             "reference_url": "${oc.env:REF_URL}"}})
        ['source.url']
    """
    if isinstance(value, Mapping):
        found: List[str] = []
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if is_secret_key(key) and item not in (None, "", {}):
                found.append(where)
            else:
                found.extend(literal_secrets(item, where))
        return found
    if isinstance(value, (list, tuple)):
        return [p for i, item in enumerate(value) for p in literal_secrets(item, f"{path}[{i}]")]
    if isinstance(value, str) and not value.startswith("${") and contains_credentials(value):
        return [path]
    return []
