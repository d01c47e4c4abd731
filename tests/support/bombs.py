"""Decompression bombs: small files whose header claims a huge image (default 13000 x 13000,
169 megapixels), one per format PIL opens. Each is a tiny real image of that format with its
size fields rewritten, so opening it reads the huge size while decoding it would be refused or
fail late; the pixel data itself is never made."""
from __future__ import annotations

import io
import struct
import zlib

from PIL import Image

SIDE = 13000
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "TIFF", "BMP")


def bomb(fmt: str, width: int = SIDE, height: int = SIDE) -> bytes:
    """Bytes of a ``fmt`` image (one of :data:`FORMATS`) whose header says ``width`` x ``height``."""
    return {"PNG": _png, "JPEG": _jpeg, "WEBP": _webp, "GIF": _gif, "TIFF": _tiff, "BMP": _bmp}[fmt](width, height)


def _small(fmt: str, mode: str = "L", **options) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (16, 16), 128).save(buffer, fmt, **options)
    return buffer.getvalue()


def _png(width: int, height: int) -> bytes:
    data = bytearray(_small("PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _jpeg(width: int, height: int) -> bytes:
    data = bytearray(_small("JPEG"))
    at = data.index(b"\xff\xc0")  # baseline start of frame: length, precision, height, width
    data[at + 5 : at + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _webp(width: int, height: int) -> bytes:
    data = bytearray(_small("WEBP", lossless=True))
    assert data[12:16] == b"VP8L" and data[20] == 0x2F
    bits = int.from_bytes(data[21:25], "little")
    bits = (bits & ~((1 << 28) - 1)) | (width - 1) | ((height - 1) << 14)
    data[21:25] = bits.to_bytes(4, "little")
    return bytes(data)


def _gif(width: int, height: int) -> bytes:
    data = bytearray(_small("GIF"))
    data[6:10] = struct.pack("<HH", width, height)  # logical screen
    table = 3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0
    at = 13 + table
    while data[at] != 0x2C:  # skip extension blocks to the image descriptor
        at += 2
        while data[at]:
            at += data[at] + 1
        at += 1
    data[at + 5 : at + 9] = struct.pack("<HH", width, height)
    return bytes(data)


def _tiff(width: int, height: int) -> bytes:
    """An uncompressed 8-bit grey TIFF (one strip) whose tags say ``width`` x ``height``."""
    tags = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 0),
            (277, 3, 1), (278, 4, height), (279, 4, width * height)]
    ifd_size = 2 + 12 * len(tags) + 4
    strip = 8 + ifd_size
    entries = b"".join(struct.pack("<HHII", tag, kind, 1, strip if tag == 273 else value) if kind == 4
                       else struct.pack("<HHIHH", tag, kind, 1, value, 0) for tag, kind, value in tags)
    return b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(tags)) + entries + b"\x00" * 4 + b"\x80" * 256


def _bmp(width: int, height: int) -> bytes:
    data = bytearray(_small("BMP"))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)
