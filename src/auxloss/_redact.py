"""Passwords in URLs, in one place: masked (``user:***@host``) in messages, removed from what is recorded.

Database and tracking URLs may carry a password (``postgresql://user:PASSWORD@host/db``, ``?password=...``). Two
behaviours, for two audiences:

- **mask** (:func:`mask_password` for one URL, :func:`mask_passwords` for every URL in a text such as a command
  line or an exception message): the password becomes ``***``, so a reader still sees that one was given. For
  error messages, log lines, and the tags auxloss writes to MLflow.
- **remove** (:func:`without_password` for one URL, :func:`command_without_passwords` and
  :func:`argv_without_passwords` for command lines): the password is dropped, leaving a URL that still works
  where libpq finds the password on its own, in the ``PGPASSWORD`` environment variable or in ``~/.pgpass``
  (psycopg2 passes a URL without a password to libpq, which reads both). For what auxloss records and may run
  again: ``results.json``, the report's "How to reproduce", ``store_url.txt``.

This module needs only the standard library, so the core, the integrations and the experiment stack can all use it
without pulling in another's extras.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = ["argv_without_passwords", "command_without_passwords", "mask_password", "mask_passwords",
           "without_password"]

# --- mask: one URL (the whole string is the URL, as SQLAlchemy's render_as_string(hide_password=True) shows it)

# scheme://user:password@host...: the user holds no ':', '/', '?', '#' or '@'. The password is matched lazily up
# to the first '@' after which a host follows (no '@', '/', '?' or '#' before the path), so a raw '@' inside
# the password is hidden with it, while a '@' later in the path or the query is not mistaken for the end of
# the credentials.
_URL_CREDENTIALS = re.compile(
    r"^(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/?#@]*):(?P<password>.*?)@(?P<tail>[^@/?#]*(?:[/?#].*)?)$",
    re.DOTALL,
)
#: The query keys whose values are secrets, for every function here: libpq's (and so psycopg2's and SQLAlchemy's)
#: ``password`` and ``sslpassword``, common spellings of it, and the tokens tracking servers take. One list, so
#: that what is masked in messages is also what is removed from what is recorded.
SECRET_QUERY_KEYS = ("password", "passwd", "pass", "pwd", "sslpassword", "secret", "token")
_KEYS = "|".join(sorted(SECRET_QUERY_KEYS, key=len, reverse=True))
_QUERY_PASSWORD = re.compile(rf"([?&](?:{_KEYS})=)[^&#]*", re.IGNORECASE)


def mask_password(url: str) -> str:
    """``url`` with its password replaced by ``***``, for messages and result files.

    ``postgresql://user:secret@host/db`` becomes ``postgresql://user:***@host/db``; a ``password=`` query
    parameter is hidden too. A URL without a password (a file path, ``sqlite:///...``,
    ``postgresql://user@host/db``) comes back unchanged.
    """
    text = str(url)
    match = _URL_CREDENTIALS.match(text)
    if match is not None:
        text = f"{match['head']}:***@{match['tail']}"
    return _QUERY_PASSWORD.sub(r"\1***", text)


# --- mask: every URL inside a free text (a command line, an exception message)
# In free text a URL has no known end, so the password stops at the first '@', '/' or blank (a raw '@' in it
# cannot be told from the host's); the query keys cover the tokens tracking servers take as well.

_TEXT_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<secret>[^@/\s]*)@")
_TEXT_SECRET_QUERY = re.compile(rf"(?P<key>(?<![A-Za-z_])(?:{_KEYS})=)[^&\s]*", re.IGNORECASE)


def mask_passwords(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***`` (userinfo and ``password=`` queries).

    >>> mask_passwords("auxloss run x.yaml --store postgresql://ana:s3cr3t@db:5432/runs?sslmode=require")
    'auxloss run x.yaml --store postgresql://ana:***@db:5432/runs?sslmode=require'
    """
    text = _TEXT_CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    return _TEXT_SECRET_QUERY.sub(lambda m: f"{m['key']}***", text)


# --- remove: what is recorded and may be run again

#: A URL with a scheme, as it appears inside a command line (up to the next blank or quote).
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]+")


def without_password(url: str) -> str:
    """``url`` with any password removed: from the ``user:password@`` part and from a ``password=`` query key."""
    try:
        parts = urlsplit(url)
    except ValueError:  # not parseable as a URL: nothing to keep but the scheme
        return url.split("://", 1)[0] + "://***" if "://" in url else url
    netloc, query, changed = parts.netloc, parts.query, False
    if "@" in netloc:
        creds, host = netloc.rsplit("@", 1)
        if ":" in creds:
            netloc, changed = f"{creds.split(':', 1)[0]}@{host}", True
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        kept = [(k, v) for k, v in pairs if k.lower() not in SECRET_QUERY_KEYS]
        if len(kept) != len(pairs):
            query, changed = urlencode(kept), True
    # Rebuilt only when a password was removed: urlunsplit normalises some URLs (sqlite:///x loses a slash).
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment)) if changed else url


def command_without_passwords(command: str) -> str:
    """A command line with the password removed from every URL in it (``--store``, ``--storage``, ...)."""
    return _URL.sub(lambda m: without_password(m.group(0)), command)


def argv_without_passwords(argv: list[str]) -> list[str]:
    """Command-line arguments with the password removed from each URL (``URL`` or ``--opt=URL``), one argument at
    a time, so that a password holding blanks or quotes is removed whole."""
    out = []
    for arg in argv:
        if "://" in arg:
            head, sep, tail = arg.partition("=") if arg.startswith("--") else ("", "", arg)
            arg = head + sep + without_password(tail)
        out.append(arg)
    return out
