"""How an output file is served: what a browser shows in place, and what it only downloads.

Images, PDFs and plain text open in the browser (a person looking at a plot, a report or a log);
anything else comes as an attachment, HTML and SVG included, since in place they would run script
with the grid's origin. The type follows the file's name, never its bytes, and ``nosniff`` keeps
the browser from guessing another; ``Content-Security-Policy: sandbox`` keeps even a file shown in
place from running anything as the grid.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import PurePosixPath
from urllib.parse import quote

from fastapi.responses import StreamingResponse

DOWNLOAD_TYPE = "application/octet-stream"
TEXT_SUFFIXES = (
    ".txt",
    ".log",
    ".csv",
    ".tsv",
    ".md",
    ".json",
    ".jsonl",
    ".yaml",
    ".yml",
    ".toml",
    ".ini",
    ".cfg",
    ".py",
)
SHOWN_IN_PLACE = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".bmp": "image/bmp",
    ".pdf": "application/pdf",
    **{suffix: "text/plain; charset=utf-8" for suffix in TEXT_SUFFIXES},
}


def presentation(name: str) -> tuple[str, dict[str, str]]:
    """The media type and headers an output file named ``name`` is served with."""
    media_type = SHOWN_IN_PLACE.get(PurePosixPath(name).suffix.lower())
    disposition = "inline" if media_type else "attachment"
    return media_type or DOWNLOAD_TYPE, {
        "Content-Disposition": f"{disposition}; filename*=UTF-8''{quote(PurePosixPath(name).name, safe='')}",
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "sandbox",
    }


def output_response(name: str, chunks: Iterable[bytes]) -> StreamingResponse:
    """The file's bytes as they are read from the store, presented by its name."""
    media_type, headers = presentation(name)
    return StreamingResponse(chunks, media_type=media_type, headers=headers)
