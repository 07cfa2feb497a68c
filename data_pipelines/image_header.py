"""The format and size of a JPEG or PNG file from its first bytes, without Pillow.

The DALI feeder needs every image's size before DALI decodes it (the crop windows are computed from
it), once per sample and step. Pillow's JPEG header parser reads every marker segment in Python;
the size lives in one of them (the start-of-frame), so walking the segment lengths to it is several
times cheaper. Formats other than JPEG and PNG, and anything these readers do not recognise, are
left to Pillow (None), which then decides exactly as it always did.
"""
from __future__ import annotations

JPEG_SIGNATURE = b"\xff\xd8\xff"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Start-of-frame markers (baseline, extended, progressive, lossless; Huffman and arithmetic coded):
# C0-CF except DHT (C4), JPG (C8) and DAC (CC).
SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
START_OF_SCAN, END_OF_IMAGE = 0xDA, 0xD9
# Markers without a length field: TEM, restart markers RST0-7, SOI.
STANDALONE_MARKERS = frozenset([0x01, *range(0xD0, 0xD8), 0xD8])


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from the first start-of-frame segment, as Pillow and libjpeg read it."""
    if not data.startswith(JPEG_SIGNATURE):
        return None
    i, end = 2, len(data)
    while i + 4 <= end:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker in STANDALONE_MARKERS:
            i += 2
            continue
        if marker in (START_OF_SCAN, END_OF_IMAGE):
            return None  # no frame header before the image data: not for this reader to judge
        if marker in SOF_MARKERS:
            if i + 9 > end:
                return None
            # segment: length (2), sample precision (1), height (2), width (2), ...
            return int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def png_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from the IHDR chunk, which the PNG format puts first."""
    if not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR" or len(data) < 24:
        return None
    return int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big")


def encoded_size(data: bytes) -> tuple[str, int, int] | None:
    """(format as Pillow names it, height, width) of a JPEG or PNG file; None for anything else."""
    for kind, read in (("JPEG", jpeg_size), ("PNG", png_size)):
        size = read(data)
        if size is not None:
            height, width = size
            return (kind, height, width) if height > 0 and width > 0 else None
    return None
