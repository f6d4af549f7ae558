"""Credentials never leave the process: database URLs are recorded without their password.

A PostgreSQL URL may carry a password (``postgresql://user:PASSWORD@host/db`` or ``?password=...``). Wherever
auxloss writes a URL or the command line that held it (``results.json``, the report's "How to reproduce",
``store_url.txt``), the password is removed, leaving a URL that still works where libpq finds the password on its
own: in the ``PGPASSWORD`` environment variable or in ``~/.pgpass`` (psycopg2 passes a URL without a password to
libpq, which reads both).
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = ["redact_argv", "redact_command", "without_password"]

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
        kept = [(k, v) for k, v in pairs if k.lower() not in ("password", "pass", "pwd")]
        if len(kept) != len(pairs):
            query, changed = urlencode(kept), True
    # Rebuilt only when a password was removed: urlunsplit normalises some URLs (sqlite:///x loses a slash).
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment)) if changed else url


def redact_command(command: str) -> str:
    """A command line with the password removed from every URL in it (``--store``, ``--storage``, ...)."""
    return _URL.sub(lambda m: without_password(m.group(0)), command)


def redact_argv(argv: list[str]) -> list[str]:
    """Command-line arguments with the password removed from each URL (``URL`` or ``--opt=URL``), one argument at
    a time, so that a password holding blanks or quotes is removed whole."""
    out = []
    for arg in argv:
        if "://" in arg:
            head, sep, tail = arg.partition("=") if arg.startswith("--") else ("", "", arg)
            arg = head + sep + without_password(tail)
        out.append(arg)
    return out
