"""Keep credentials out of everything we write: MLflow params/tags, run.json, logs, errors.

Three kinds of secret are masked as `***`:
- passwords (and bare tokens) in URI user info: `https://user:pass@host` -> `https://user:***@host`;
- values of secret-named keys in text or mappings: `KAGGLE_KEY=abc`, `"password": "x"`,
  `?token=abc`;
- the literal values of environment variables whose names say they are secret
  (`*KEY*`, `*TOKEN*`, `*SECRET*`, `*PASSWORD*`, ...) and the Kaggle API key file, wherever
  those values appear.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MASK = "***"
# Not "pwd": that is the shell's working directory ($PWD), not a password.
SECRET_NAME = re.compile(r"(?i)(key|token|secret|passw(or)?d|credential)")
# Shorter values ("1", "true", "auto") would mask innocent text everywhere.
MIN_SECRET_LENGTH = 6

_URI_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^/\s:@]*)"
                           r"(?::(?P<password>[^/\s@]*))?@")
# The secret word ends the name: `KAGGLE_KEY`, `api_token`, not `KeyError` or `tokens_per_s`.
_NAME = r"[A-Za-z0-9_.-]*(?:key|token|secret|passw(?:or)?d|credentials?)"
# name=value, name: value, "name": "value", ?name=value (value up to a delimiter).
_ASSIGNMENT = re.compile(rf"(?i)(?P<name>\b{_NAME}[\"']?\s*[=:]\s*[\"']?)(?P<value>[^\s\"'&,;}}]+)")


def _uri_userinfo(match: re.Match) -> str:
    if match["password"] is not None:
        return f"{match['scheme']}{match['user']}:{MASK}@"
    # A bare user part is commonly a token (https://<token>@github.com): mask it too.
    return f"{match['scheme']}{MASK}@" if match["user"] else match[0]


def _kaggle_key() -> str | None:
    folder = os.environ.get("KAGGLE_CONFIG_DIR") or Path.home() / ".kaggle"
    try:
        return json.loads((Path(folder) / "kaggle.json").read_text()).get("key")
    except (OSError, ValueError, AttributeError):
        return None


def secret_values() -> list[str]:
    """Values of secret-named environment variables (and the Kaggle key), longest first."""
    values = {v for k, v in os.environ.items() if SECRET_NAME.search(k)}
    values.add(_kaggle_key() or "")
    return sorted((v for v in values if len(v) >= MIN_SECRET_LENGTH), key=len, reverse=True)


def redact(text: str) -> str:
    """`text` with every secret we can recognise replaced by `***`."""
    text = str(text)
    for value in secret_values():
        text = text.replace(value, MASK)
    text = _URI_USERINFO.sub(_uri_userinfo, text)
    return _ASSIGNMENT.sub(lambda m: m["name"] + MASK, text)


def redact_mapping(data: dict) -> dict:
    """A copy with secret-named keys masked and every string value redacted (nested)."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out[key] = redact_mapping(value)
        elif SECRET_NAME.search(str(key)) and value not in (None, "", False):
            out[key] = MASK
        else:
            out[key] = redact(value) if isinstance(value, str) else value
    return out


class RedactingRecordFactory:
    """Log record factory that redacts the formatted message of every record, any logger."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, *args, **kwargs) -> logging.LogRecord:
        record = self.inner(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is the logging module's to report
            return record
        record.msg, record.args = redact(message), ()
        return record


def install_log_redaction() -> None:
    """Redact every log record of this process (MLflow logs run URLs with the tracking URI)."""
    factory = logging.getLogRecordFactory()
    if not isinstance(factory, RedactingRecordFactory):
        logging.setLogRecordFactory(RedactingRecordFactory(factory))


@contextmanager
def redacted_errors() -> Iterator[None]:
    """Re-raise an exception whose message holds a secret with the secret masked.

    The original is dropped from the chain (`from None`): its traceback would print it.
    """
    try:
        yield
    except Exception as exc:
        message = str(exc)
        clean = redact(message)
        if clean == message:
            raise
        try:
            replacement = type(exc)(clean)
        except Exception:
            replacement = RuntimeError(f"{type(exc).__name__}: {clean}")
        raise replacement.with_traceback(sys.exc_info()[2]) from None
