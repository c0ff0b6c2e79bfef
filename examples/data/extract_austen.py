"""Rebuild pride_and_prejudice.txt.gz from Debian's r-cran-janeaustenr package (how the file here was made).

    apt-get download r-cran-janeaustenr && dpkg-deb -x r-cran-janeaustenr_1.0.0-1_all.deb pkg
    python examples/data/extract_austen.py pkg/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb

The package's lazy-load database holds one R character vector per novel (one element per line of the Project
Gutenberg text); each record is a 4-byte big-endian length and a zlib stream of R's XDR serialization. This reads
the fifth record (``prideprejudice``, in the order of Rdata.rdx) and joins its lines with newlines.
"""

from __future__ import annotations

import gzip
import struct
import sys
import zlib
from pathlib import Path


def character_vectors(rdb: bytes) -> list[list[str]]:
    """Every record of a lazy-load database that is a plain character vector (STRSXP), in file order."""
    out, pos = [], 0
    while pos < len(rdb):
        inflate = zlib.decompressobj()
        data = inflate.decompress(rdb[pos + 4 :])
        pos = len(rdb) - len(inflate.unused_data)
        assert data[:2] == b"X\n", "not an XDR serialization"
        i = 14  # "X\n", format version, writer's R version, oldest reader's R version
        if struct.unpack(">i", data[2:6])[0] == 3:  # version 3 adds the native encoding's name
            i += 4 + struct.unpack(">i", data[i : i + 4])[0]
        flags, n = struct.unpack(">ii", data[i : i + 8])
        i += 8
        if flags & 0xFF != 16:
            continue
        strings = []
        for _ in range(n):
            _, length = struct.unpack(">ii", data[i : i + 8])
            i += 8
            strings.append("" if length < 0 else data[i : i + length].decode("utf-8"))
            i += max(length, 0)
        out.append(strings)
    return out


def main() -> None:
    novels = character_vectors(Path(sys.argv[1]).read_bytes())
    lines = novels[4]
    assert lines[0] == "PRIDE AND PREJUDICE", lines[:3]
    text = "\n".join(lines).encode("utf-8") + b"\n"
    target = Path(__file__).with_name("pride_and_prejudice.txt.gz")
    target.write_bytes(gzip.compress(text, compresslevel=9, mtime=0))
    print(f"{target}: {len(text):,} bytes of text")


if __name__ == "__main__":
    main()
