"""Credentials never reach output: one rule for URLs, one scrub for any text.

`redact(url)`: a URL as it may be printed or stored (no userinfo, no query string: signed
URLs carry their signature there). `scrub(text, secrets)`: any message, e.g. a library's
exception text, with every known secret string removed and every URL in it redacted; the
CLI passes it everything the user gave that could hold a secret (userinfo and query
strings of URL arguments, the values of --storage-options).
"""

from __future__ import annotations

import re
from typing import Iterable
from urllib.parse import urlsplit

REPLACEMENT = "***"
# userinfo: "user@" or "key:secret@"; a secret may hold a raw "/" (users paste keys unencoded)
_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?:[^/\s@'\"]*|[^/\s@'\":]*:[^\s@'\"]*)@")
_QUERY = re.compile(r"(\b(?!file://)[a-zA-Z][a-zA-Z0-9+.-]*://[^\s?'\"]*)\?[^\s'\"]*")


def redact(url: str) -> str:
    """Drop credentials and query strings from a URL before it is printed or stored.

    Only URLs with a scheme (s3://, https://) have userinfo and query strings; a local
    path or file:// URL keeps its `?` (`what?.jpg` is a file name)."""
    if "://" not in url:
        return url
    url = _USERINFO.sub(r"\1", url, count=1)
    if url.startswith("file://"):
        return url
    return url.split("?", 1)[0]


def secrets_in(values: Iterable[object], every_string: bool = False) -> set[str]:
    """The secret parts of user-given values (nested in dicts and lists): URL userinfo and
    query strings; with every_string, every string (storage options hold keys and tokens)."""
    found: set[str] = set()
    for value in values:
        if isinstance(value, dict):
            found |= secrets_in(value.values(), every_string)
        elif isinstance(value, (list, tuple)):
            found |= secrets_in(value, every_string)
        elif isinstance(value, str) and every_string:
            found.add(value)
        elif isinstance(value, str) and "://" in value:
            match = _USERINFO.match(value)
            if match:  # the userinfo and each of its parts
                userinfo = value[match.end(1) : match.end() - 1]
                found |= {userinfo, *userinfo.split(":", 1)}
            query = urlsplit(value).query
            if query:
                found |= {query, *(pair.split("=", 1)[-1] for pair in query.split("&"))}
    return {s for s in found if len(s) >= 3}


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """text with the given secrets replaced and every URL's userinfo and query string dropped."""
    for secret in sorted(set(secrets), key=len, reverse=True):
        text = text.replace(secret, REPLACEMENT)
    return _QUERY.sub(r"\1", _USERINFO.sub(r"\1", text))
