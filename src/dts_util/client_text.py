"""Client-supplied strings, made safe to quote in error messages and to write to logs.

A client controls every byte of a name, prompt or sampler it sends. Quoted back
in an error or written to a log line, such a string must neither be huge (a 32 MiB
name once produced a 32 MiB log line) nor carry newlines or escape codes (which
forge log lines or repaint a terminal). Both helpers escape control characters
and cut the string to a bounded length, saying how long it really was.
"""

from __future__ import annotations

# Error messages quote at most this many characters of any one client string.
QUOTE_CHARS = 200
# Log lines keep at most this many characters of any one client-derived field.
LOG_FIELD_CHARS = 300


def _escape(text: str) -> str:
    """Backslash-escape control characters (C0, DEL, C1) and lone surrogates; keep other text as is."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif code < 0x20 or 0x7F <= code < 0xA0 or code in (0x2028, 0x2029) or 0xD800 <= code < 0xE000:
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(ch, f"\\x{code:02x}" if code < 0x100
                                                                  else f"\\u{code:04x}"))
        else:
            out.append(ch)
    return "".join(out)


def _cut(text: str, limit: int) -> tuple[str, str]:
    if len(text) <= limit:
        return text, ""
    return text[:limit], f"… ({len(text)} characters)"


def quote(value: str, limit: int = QUOTE_CHARS) -> str:
    """``value`` in single quotes, escaped and cut to ``limit`` characters, for an error message."""
    head, tail = _cut(value, limit)
    return "'" + _escape(head).replace("'", "\\'") + "'" + tail


def for_log(value: object, limit: int = LOG_FIELD_CHARS) -> str:
    """``str(value)`` escaped and cut to ``limit`` characters, for one field of a log line."""
    head, tail = _cut(str(value), limit)
    return _escape(head) + tail
