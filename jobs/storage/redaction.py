"""Credentials never reach output: one parser for URLs, one scrub for any text.

A URL is parsed, never pattern-matched: `scheme://authority/path?query#fragment`, the
authority ending at the first `/`, `?` or `#` and its userinfo at the LAST `@` in it (a
password may hold a raw `@`, `'`, `:`, `%` or any character). One departure from RFC 3986,
because users paste keys unencoded: `scheme://key:sec/ret@host/…` (a raw `/` in the
secret) is recognised when the authority's `:` is not followed by a port.

`redact(url)`: a URL as it may be printed (no userinfo, no query string: signed URLs carry
their signature there). `image_name(url)`: the name that identifies an image in rows,
shard hashing and the cache: no userinfo and no signing parameters, but every other part of
the query kept as a digest, so that `…/image?id=1` and `…/image?id=2` stay two images
(identity is the URL; only authentication is dropped). `scrub(text, secrets)`: any
message, e.g. a library's exception text, with every known secret string removed and every
URL in it redacted; the CLI passes it everything the user gave that could hold a secret.
"""

from __future__ import annotations

import hashlib
import re
from typing import Iterable, NamedTuple
from urllib.parse import parse_qsl

REPLACEMENT = "***"
_SCHEME = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://")
# Query parameters that authenticate a request rather than name a resource: presigned URLs
# of S3 (SigV4 `X-Amz-*`), GCS (`X-Goog-*`) and the older key + signature schemes. Two URLs
# differing only in these name the same object; a renewed signature keeps the image's name.
_SIGNING_PREFIXES = ("x-amz-", "x-goog-")
_SIGNED_BY_KEY = {"signature", "awsaccesskeyid", "googleaccessid", "key-pair-id", "expires", "policy"}  # with "signature"
_AZURE_SAS = {"sv", "ss", "srt", "sp", "se", "st", "spr", "sig", "sr", "si", "sdd", "skoid", "sktid", "skt", "ske",
              "sks", "skv", "ses"}  # with both "sig" and "sv"
QUERY_DIGEST = "query-sha256"


class ParsedURL(NamedTuple):
    scheme: str  # "s3://", "" for a local path
    userinfo: str  # "" when none
    rest: str  # host and path, without userinfo, query or fragment
    query: str  # without "?"; "" when none
    fragment: str  # without "#"; http(s) only: elsewhere "#" is part of the key


def parse_url(url: str) -> ParsedURL:
    """Split a URL; a local path (no `scheme://`) or a file:// URL is all path (`what?.jpg`)."""
    match = _SCHEME.match(url)
    if not match:
        return ParsedURL("", "", url, "", "")
    scheme, after = match.group(0), url[match.end():]
    end = min((i for i in (after.find(c) for c in "/?#") if i >= 0), default=len(after))
    authority, userinfo = after[:end], ""
    if "@" in authority:
        userinfo, _, host = authority.rpartition("@")
        after = host + after[end:]
    elif (":" in authority and not authority.startswith("[") and not authority.partition(":")[2].isdigit()
          and "@" in after[end:]):
        # key:sec/ret@host: a raw "/" in the secret (not host:port); a host holds no "@": the
        # userinfo runs to the last "@" before the "/" that follows its first "@"
        at = after.index("@")
        while True:
            stop = min((i for i in (after.find(c, at + 1) for c in "/?#") if i >= 0), default=len(after))
            later = after.rfind("@", at + 1, stop)
            if later < 0:
                break
            at = later
        userinfo, after = after[:at], after[at + 1:]
    if scheme.lower() == "file://":
        return ParsedURL(scheme, userinfo, after, "", "")
    fragment = ""
    if scheme.lower() in ("http://", "https://") and "#" in after:
        after, _, fragment = after.partition("#")
    rest, _, query = after.partition("?")
    return ParsedURL(scheme, userinfo, rest, query, fragment)


def redact(url: str) -> str:
    """A URL without credentials, query string or fragment, to print or store; local paths whole."""
    parsed = parse_url(url)
    return parsed.scheme + parsed.rest if parsed.scheme else url


def _signing(keys: set[str]) -> set[str]:
    found = {k for k in keys if k.startswith(_SIGNING_PREFIXES)}
    if "signature" in keys:
        found |= keys & _SIGNED_BY_KEY
    if {"sig", "sv"} <= keys:
        found |= keys & _AZURE_SAS
    return found


def image_name(url: str) -> str:
    """The identity of an image, safe to store: redact(url), plus `?query-sha256=<16 hex>`
    when the query (signing parameters left out) or the fragment is not empty. Distinct
    resources keep distinct names; nothing of the query can be read back from the name."""
    parsed = parse_url(url)
    if not parsed.scheme:
        return url
    pairs = parse_qsl(parsed.query, keep_blank_values=True)
    signing = _signing({key.lower() for key, _ in pairs})
    kept = "&".join(part for part, (key, _) in zip(_query_parts(parsed.query), pairs) if key.lower() not in signing)
    if len(pairs) != len(_query_parts(parsed.query)):  # parse_qsl dropped odd parts: keep the query whole
        kept = parsed.query
    identity = kept + ("#" + parsed.fragment if parsed.fragment else "")
    if not identity:
        return parsed.scheme + parsed.rest
    digest = hashlib.sha256(identity.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{parsed.scheme}{parsed.rest}?{QUERY_DIGEST}={digest}"


def _query_parts(query: str) -> list[str]:
    return [part for part in query.split("&") if part]


def secrets_in(values: Iterable[object], every_string: bool = False) -> set[str]:
    """The secret parts of user-given values (nested in dicts and lists): URL userinfo,
    query strings and fragments; with every_string, every string (storage options hold keys
    and tokens)."""
    found: set[str] = set()
    for value in values:
        if isinstance(value, dict):
            found |= secrets_in(value.values(), every_string)
        elif isinstance(value, (list, tuple)):
            found |= secrets_in(value, every_string)
        elif isinstance(value, str) and every_string:
            found.add(value)
        elif isinstance(value, str) and "://" in value:
            parsed = parse_url(value)
            if parsed.userinfo:  # the userinfo and each of its parts
                found |= {parsed.userinfo, *parsed.userinfo.split(":", 1)}
            # any scheme's `?…` and `#…` (file:// too: its `?` may be a file name, or a token)
            query, _, fragment = parsed.rest.partition("?")[2].partition("#") if not parsed.query else ("", "", "")
            for hidden in (parsed.query, parsed.fragment, query, fragment):
                if hidden:
                    found |= {hidden, *(pair.split("=", 1)[-1] for pair in hidden.split("&"))}
    return {s for s in found if len(s) >= 3}


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """text with the given secrets replaced and every URL in it redacted: a URL runs from its
    `scheme://` to the next whitespace."""
    for secret in sorted(set(secrets), key=len, reverse=True):
        text = text.replace(secret, REPLACEMENT)
    pieces, position = [], 0
    for match in _SCHEME.finditer(text):
        if match.start() < position:
            continue
        end = next((i for i in range(match.end(), len(text)) if text[i].isspace()), len(text))
        token = text[match.start():end]
        quote = token[-1] if token[-1:] in "'\")]>,;" and len(token) > len(match.group(0)) else ""
        pieces += [text[position:match.start()], redact(token[:len(token) - len(quote)]) + quote]
        position = end
    return "".join(pieces) + text[position:]
