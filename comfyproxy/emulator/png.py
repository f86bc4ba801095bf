"""Just enough PNG for the emulator: write a solid-colour RGB image with text chunks, read a PNG's size."""

import struct
import zlib
from pathlib import Path

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Rows are compressed in slices so that a 4096x4096 image never needs its 50 MB of raw pixels at once.
_ROWS_PER_SLICE = 256


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _text_chunk(key: str, value: str) -> bytes:
    try:
        return _chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1"))
    except UnicodeEncodeError:
        # iTXt: keyword, no compression, empty language tag and translated keyword, UTF-8 text.
        return _chunk(b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + value.encode("utf-8"))


def solid_png(
    width: int, height: int, rgb: tuple[int, int, int], text: dict[str, str], compress_level: int
) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    row = b"\0" + bytes(rgb) * width  # filter type 0, then the pixels
    compressor = zlib.compressobj(compress_level)
    parts = []
    for first in range(0, height, _ROWS_PER_SLICE):
        parts.append(compressor.compress(row * min(_ROWS_PER_SLICE, height - first)))
    parts.append(compressor.flush())
    return b"".join(
        [
            _SIGNATURE,
            _chunk(b"IHDR", header),
            *(_text_chunk(key, value) for key, value in text.items()),
            _chunk(b"IDAT", b"".join(parts)),
            _chunk(b"IEND", b""),
        ]
    )


def png_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from a PNG's header, or None if the file is not a PNG."""
    with path.open("rb") as file:
        head = file.read(24)
    if len(head) < 24 or not head.startswith(_SIGNATURE) or head[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", head[16:24])
    return width, height
