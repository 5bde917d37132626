"""HTML building blocks of the report: escaping, how values print, and the tables every section uses.

Owns the one rule for printing a number (`format_number`), the number span that carries the summary path
and the exact value it shows (so a test can check every number against summary.json), readable key/value
tables for nested values (settings, records such as batch sizes: never raw JSON in a cell), and embedded
images as data: URIs.
"""

from __future__ import annotations

import base64
import html
import json
from typing import Any, Mapping, Optional, Sequence, Tuple

from ssim_ray.report.charts import Plot


def esc(value: Any) -> str:
    """Text escaped for HTML content and attribute values.

    Example:
        >>> esc("<a href='x'>")
        '&lt;a href=&#x27;x&#x27;&gt;'
    """
    return html.escape(str(value), quote=True)


def format_number(value: Any, *, digits: int = 4, percent: bool = False) -> str:
    """How the report prints a number: floats with `digits` decimals (as a percentage if `percent`), ints
    with thousands separators, None as a dash.

    Args:
        value: a number, None, or anything else (printed as str).
        digits: decimals of a float.
        percent: print a fraction as a percentage.

    Returns:
        The text.

    Example:
        >>> format_number(0.123456), format_number(1234567), format_number(None)
        ('0.1235', '1,234,567', '–')
        >>> format_number(0.1667, digits=2, percent=True)
        '16.67%'
    """
    if value is None:
        return "–"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if percent:
        return f"{100 * value:.{digits}f}%"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def number(value: Any, path: Sequence[Any], *, digits: int = 4, percent: bool = False) -> str:
    """A number as shown, in a span naming the summary path it comes from and how it is formatted.

    Args:
        value: the summary's value at `path`.
        path: keys (and list indices) from the summary's root.
        digits: decimals of a float.
        percent: print a fraction as a percentage.

    Returns:
        `<span class="v" data-key=... data-value=... data-digits=... [data-percent]>text</span>`.

    Example:
        >>> number(3, ["pairs", "ok"])
        '<span class="v" data-key="[&quot;pairs&quot;, &quot;ok&quot;]" data-value="3" data-digits="4">3</span>'
    """
    flag = " data-percent" if percent else ""
    return (f'<span class="v" data-key="{esc(json.dumps(list(path)))}" data-value="{esc(json.dumps(value))}" '
            f'data-digits="{digits}"{flag}>{esc(format_number(value, digits=digits, percent=percent))}</span>')


def number_cell(value: Any, path: Sequence[Any], *, digits: int = 4, percent: bool = False) -> str:
    """A right-aligned table cell holding `number(...)`, with the raw value as its sort key.

    Example:
        >>> number_cell(None, ["x"])[:14]
        '<td class="n">'
    """
    sort = "" if value is None else f' data-sort="{esc(value)}"'
    return f'<td class="n"{sort}>{number(value, path, digits=digits, percent=percent)}</td>'


def lookup(summary: Mapping[str, Any], path: Sequence[Any]) -> Any:
    """The summary's value at `path`.

    Example:
        >>> lookup({"a": [{"b": 2}]}, ["a", 0, "b"])
        2
    """
    value: Any = summary
    for key in path:
        value = value[key]
    return value


def header_rows(pairs: Sequence[Tuple[str, str]]) -> str:
    """Table rows of (label, HTML content): the label in a row header.

    Example:
        >>> header_rows([("a", "1")])
        '<tr><th>a</th><td>1</td></tr>'
    """
    return "".join(f"<tr><th>{esc(label)}</th><td>{content}</td></tr>" for label, content in pairs)


def setting_text(value: Any) -> str:
    """A setting's value as a reader writes it in a config: exact numbers, true/false, none, lists joined.

    Example:
        >>> [setting_text(v) for v in (1.5, 0.01, True, None, ["s3", "gs"], "fp32")]
        ['1.5', '0.01', 'true', 'none', 's3, gs', 'fp32']
    """
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ", ".join(setting_text(v) for v in value) if value else "(empty)"
    return str(value)


def settings_table(settings: Mapping[str, Any], *, caption: Optional[str] = None, css: str = "kv") -> str:
    """Every key of a settings mapping with its value as text; nested mappings as nested tables.

    Args:
        settings: e.g. the summary's `metric` or `source`.
        caption: the table's caption.
        css: the table's class.

    Returns:
        A `<table>`; an empty mapping gives a table with one row saying so.

    Example:
        >>> settings_table({"sigma": 1.5, "storage_options": {}})
        '<table class="kv"><tr><th>sigma</th><td>1.5</td></tr><tr><th>storage_options</th><td>(empty)</td></tr></table>'
    """
    def cell(value: Any) -> str:
        if isinstance(value, Mapping):
            return settings_table(value) if value else "(empty)"
        return esc(setting_text(value))

    head = f"<caption>{esc(caption)}</caption>" if caption else ""
    rows = header_rows([(key, cell(value)) for key, value in settings.items()]) or "<tr><td>(none recorded)</td></tr>"
    return f'<table class="{esc(css)}">{head}{rows}</table>'


def records_table(records: Mapping[str, Any], path: Sequence[Any], *, key_label: str, caption: str,
                  value_label: str = "value") -> str:
    """A mapping of records as one table: a row per key, a column per field of the records.

    Numbers are shown as `number` spans (with their summary paths), lists of numbers joined by commas; a
    plain number instead of a record gets a single column, headed `value_label`.

    Args:
        records: e.g. the summary's `batch_sizes` ({bucket: {"batch_sizes": [...], "ooms": n}}).
        path: the summary path of `records`.
        key_label: the heading of the key column.
        caption: the table's caption.
        value_label: the heading of the column of plain numbers.

    Returns:
        A `<table class="records">`.

    Example:
        >>> "<th>ooms</th>" in records_table({"a": {"batch_sizes": [2], "ooms": 0}}, ["b"], key_label="k", caption="c")
        True
    """
    columns = list(dict.fromkeys(f for r in records.values() if isinstance(r, Mapping) for f in r)) or [value_label]

    def cell(key: str, field: str) -> str:
        record = records[key]
        if not isinstance(record, Mapping):
            return number(record, [*path, key]) if field == value_label else ""
        value, where = record.get(field), [*path, key, field]
        if isinstance(value, list):
            return ", ".join(number(v, [*where, i]) for i, v in enumerate(value))
        return number(value, where) if isinstance(value, (int, float)) or value is None else esc(setting_text(value))

    head = f"<tr><th>{esc(key_label)}</th>" + "".join(f"<th>{esc(c.replace('_', ' '))}</th>" for c in columns) + "</tr>"
    body = "".join(f"<tr><th>{esc(key)}</th>" + "".join(f'<td class="n">{cell(key, c)}</td>' for c in columns) + "</tr>"
                   for key in records)
    return f'<table class="records"><caption>{esc(caption)}</caption>{head}{body}</table>'


def data_uri(png: bytes) -> str:
    """A data: URI for PNG bytes, so the page embeds the image instead of loading it.

    Example:
        >>> data_uri(b"abc")
        'data:image/png;base64,YWJj'
    """
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def image_figure(plot: Plot, *, file_note: bool = False) -> str:
    """A `<figure>` embedding a plot at its page size, with its caption (and file name under plots/).

    Example:
        >>> image_figure(Plot("a.png", "A", b"", 10, 5))[:40]
        '<figure><img src="data:image/png;base64,'
    """
    caption = esc(plot.caption) + (f" (plots/{esc(plot.name)})" if file_note else "")
    return (f'<figure><img src="{data_uri(plot.png)}" width="{plot.width}" height="{plot.height}" '
            f'alt="{esc(plot.caption)}"><figcaption>{caption}</figcaption></figure>')
