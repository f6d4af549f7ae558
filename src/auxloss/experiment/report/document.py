"""The report's document model: one list of blocks rendered to both Markdown and HTML.

Both text formats come from the same blocks, so report.md and report.html always carry the same content.
Every user-given string (variant and task names, commands) is escaped by the renderer, never by the sections.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from urllib.parse import quote

__all__ = ["Block", "Bullets", "Code", "Fig", "Heading", "Inline", "Para", "Table", "link_target", "render_html",
           "render_md"]

# A span of inline text: (style, text) with style "" (plain), "b" (bold), "code" or "link" (a relative path
# shown as code and linked to; percent-encoded, so a path such as "javascript:x" stays a path, never a scheme).
Span = tuple[str, str]
Inline = str | Span


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Para:
    parts: list[Inline]


@dataclass
class Bullets:
    items: list[list[Inline]]


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    #: Per column: right-aligned (numbers) or not.
    right: list[bool]


@dataclass
class Fig:
    """A figure under ``figures/``, referenced by relative path."""

    file: str
    alt: str
    caption: str


@dataclass
class Code:
    text: str


Block = Heading | Para | Bullets | Table | Fig | Code


# --------------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------------


def link_target(path: str) -> str:
    """A relative path as a link target: every character but letters, digits, ``/._-~`` percent-encoded."""
    return quote(path, safe="/")


def md_escape(text: str, table: bool = False) -> str:
    """Backslash-escape what markdown would otherwise interpret in a user-given name or number."""
    text = " ".join(str(text).splitlines())
    for ch in ("\\", "`", "*"):
        text = text.replace(ch, "\\" + ch)
    # Only what could start an HTML tag/autolink ("<b", "</", "<!") or an inline link ("](") is escaped,
    # so that ordinary text such as "p < 0.001" or "[95% CI]" stays readable in the raw file.
    text = re.sub(r"<(?=[A-Za-z/!?])", r"\\<", text).replace("](", "]\\(")
    return text.replace("|", "\\|") if table else text


def _md_inline(parts: list[Inline]) -> str:
    out = []
    for p in parts:
        style, text = ("", p) if isinstance(p, str) else p
        if style == "b":
            out.append(f"**{md_escape(text)}**")
        elif style == "code":
            fence = "``" if "`" in text else "`"
            out.append(f"{fence}{text}{fence}")
        elif style == "link":
            fence = "``" if "`" in text else "`"
            out.append(f"[{fence}{text}{fence}]({link_target(text)})")
        else:
            out.append(md_escape(text))
    return "".join(out)


def md_table(header: list[str], rows: list[list[str]], right: list[bool]) -> str:
    """A pipe table; cells are escaped, so a '|' in a name cannot split a row."""
    lines = ["| " + " | ".join(md_escape(c, table=True) for c in header) + " |"]
    lines.append("| " + " | ".join("---:" if r else "---" for r in right) + " |")
    lines += ["| " + " | ".join(md_escape(c, table=True) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_md(blocks: list[Block]) -> str:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append("#" * b.level + " " + md_escape(b.text))
        elif isinstance(b, Para):
            out.append(_md_inline(b.parts))
        elif isinstance(b, Bullets):
            out.append("\n".join("- " + _md_inline(item) for item in b.items))
        elif isinstance(b, Table):
            out.append(md_table(b.header, b.rows, b.right))
        elif isinstance(b, Fig):
            out.append(f"![{md_escape(b.alt)}](figures/{b.file})\n\n*{md_escape(b.caption)}*")
        elif isinstance(b, Code):
            fence = "```"
            while fence in b.text:
                fence += "`"
            out.append(f"{fence}\n{b.text}\n{fence}")
    return "\n\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------------------
# HTML: one self-contained page, CSS inline, figures by relative path
# --------------------------------------------------------------------------------------------------------

_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.5; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { border-bottom: 1px solid #eee; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: .92em; }
th, td { border: 1px solid #ddd; padding: .35em .6em; vertical-align: top; }
th { background: #f5f5f5; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: .9em; }
pre { background: #f6f8fa; padding: .8em; overflow-x: auto; }
code { background: #f6f8fa; padding: 0 .2em; }
"""


def _html_inline(parts: list[Inline]) -> str:
    out = []
    for p in parts:
        style, text = ("", p) if isinstance(p, str) else p
        esc = html.escape(text)
        if style == "link":
            out.append(f'<a href="{html.escape(link_target(text), quote=True)}"><code>{esc}</code></a>')
            continue
        out.append(
            f"<strong>{esc}</strong>" if style == "b" else f"<code>{esc}</code>" if style == "code" else esc
        )
    return "".join(out)


def render_html(blocks: list[Block], title: str) -> str:
    body: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            body.append(f"<p>{_html_inline(b.parts)}</p>")
        elif isinstance(b, Bullets):
            items = "".join(f"<li>{_html_inline(i)}</li>" for i in b.items)
            body.append(f"<ul>{items}</ul>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b.header)
            rows = []
            for row in b.rows:
                cells = "".join(
                    f'<td class="num">{html.escape(c)}</td>' if r else f"<td>{html.escape(c)}</td>"
                    for c, r in zip(row, b.right)
                )
                rows.append(f"<tr>{cells}</tr>")
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")
        elif isinstance(b, Fig):
            src = html.escape(f"figures/{b.file}", quote=True)
            body.append(
                f'<figure><img src="{src}" alt="{html.escape(b.alt, quote=True)}">'
                f"<figcaption>{html.escape(b.caption)}</figcaption></figure>"
            )
        elif isinstance(b, Code):
            body.append(f"<pre><code>{html.escape(b.text)}</code></pre>")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )
