"""Cuts a CUDA shared library's device code down to what one GPU architecture loads.

A CUDA library's ``.nv_fatbin`` section holds fatbin containers, one per compilation unit,
each with one entry per target: a cubin (ELF) for each ``sm_XX`` it was built for, and PTX
for some. On a GPU of compute capability ``--arch`` (90: H100, H200) the CUDA driver loads,
per container, the cubin of that architecture, or where a container has none, JIT-compiles
its PTX of the highest version not above it. Every other entry is never read there.

Each never-read entry's payload is replaced by the smallest payload of the same kind and
architecture in the file (a valid, compressed cubin or PTX that the driver would load only on
another GPU), and the rest of its room is zeroed. Headers, sizes and offsets stay as they were,
so the library's layout, its host code and every pointer into the section are unchanged, and
the kept entries are byte for byte the originals (checked after writing). Zeroed room and
repeated payloads compress to almost nothing: vLLM 0.26.0's ``_C_stable_libtorch.abi3.so``
(79 MB, cubins for sm_75 to sm_120) packs to 15 MB with xz instead of 56.

Entry header layout (little endian; the fields used here): kind u16 (1 PTX, 2 ELF) at 0,
header size u32 at 4, payload size u64 at 8, compressed size u32 at 16, arch u32 at 28,
flags u64 at 40 (0x8000: zstd-compressed payload), decompressed size u64 at 56.

    python bench/gpu/peer_fatbin.py SRC.so DST.so [--arch 90]
"""

from __future__ import annotations

import argparse
import struct
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

MAGIC = 0xBA55ED50
PTX, ELF = 1, 2
ZSTD = 0x8000


@dataclass(frozen=True)
class Entry:
    container: int   # offset of its container's header in the file
    at: int          # offset of its header in the file
    kind: int
    header_size: int
    size: int        # payload bytes (padded)
    compressed_size: int
    arch: int
    flags: int

    @property
    def payload(self) -> slice:
        return slice(self.at + self.header_size, self.at + self.header_size + self.size)


def fatbin_section(path: Path) -> tuple[int, int]:
    """(file offset, size) of ``.nv_fatbin``, read by readelf."""
    out = subprocess.run(["readelf", "-S", "-W", str(path)], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if " .nv_fatbin " in line:
            fields = line.split("]", 1)[1].split()
            return int(fields[3], 16), int(fields[4], 16)
    raise SystemExit(f"{path} has no .nv_fatbin section")


def entries(buf: bytes, start: int, end: int) -> list[Entry]:
    found = []
    off = start
    while off + 16 <= end:
        magic, _version, header_size, fat_size = struct.unpack_from("<IHHQ", buf, off)
        if magic != MAGIC:  # containers are 8-byte aligned; padding between them
            off += 8
            continue
        at, stop = off + header_size, off + header_size + fat_size
        while at < stop:
            kind, _, ehs, size, csize = struct.unpack_from("<HHIQI", buf, at)
            arch, = struct.unpack_from("<I", buf, at + 28)
            flags, = struct.unpack_from("<Q", buf, at + 40)
            found.append(Entry(off, at, kind, ehs, size, csize, arch, flags))
            at += ehs + size
        off = stop
    return found


def loaded_on(group: list[Entry], arch: int) -> set[int]:
    """Offsets of the entries of one container that a GPU of ``arch`` may load."""
    if any(e.kind == ELF and e.arch == arch for e in group):
        return {e.at for e in group if e.kind == ELF and e.arch == arch}
    return {e.at for e in group if e.kind == PTX and e.arch <= arch}


def strip(src: Path, dst: Path, arch: int) -> Counter:
    buf = bytearray(src.read_bytes())
    start, size = fatbin_section(src)
    found = entries(buf, start, start + size)
    donors: dict[tuple, Entry] = {}
    for e in found:
        key = (e.kind, e.arch, e.flags & ZSTD)
        if key not in donors or (e.compressed_size or e.size) < (donors[key].compressed_size or donors[key].size):
            donors[key] = e
    donor_bytes = {k: (bytes(buf[d.payload][:d.compressed_size or d.size]), d.compressed_size,
                       struct.unpack_from("<Q", buf, d.at + 56)[0]) for k, d in donors.items()}
    groups: dict[int, list[Entry]] = {}
    for e in found:
        groups.setdefault(e.container, []).append(e)
    kept: set[int] = set()
    for group in groups.values():
        kept |= loaded_on(group, arch)
    tally: Counter = Counter()
    for e in found:
        label = f"{'ELF' if e.kind == ELF else 'PTX'} sm_{e.arch}"
        if e.at in kept:
            tally[f"kept {label}"] += 1
            continue
        data, csize, dsize = donor_bytes[(e.kind, e.arch, e.flags & ZSTD)]
        if len(data) > e.size:
            raise SystemExit(f"entry at {e.at:#x} is smaller than its stand-in; nothing written")
        buf[e.payload] = data + bytes(e.size - len(data))
        struct.pack_into("<I", buf, e.at + 16, csize)
        struct.pack_into("<Q", buf, e.at + 56, dsize)
        tally["bytes replaced"] += e.size
    dst.write_bytes(buf)
    check(src, dst, kept)
    return tally


def check(src: Path, dst: Path, kept: set[int]) -> None:
    """The entries a GPU of the kept architecture loads are byte for byte the originals, and
    the rest of the file outside the section is untouched."""
    a, b = src.read_bytes(), dst.read_bytes()
    start, size = fatbin_section(src)
    if len(a) != len(b) or a[:start] != b[:start] or a[start + size:] != b[start + size:]:
        raise SystemExit(f"{dst}: bytes outside .nv_fatbin changed")
    for e in entries(a, start, start + size):
        if e.at in kept and a[e.at:e.payload.stop] != b[e.at:e.payload.stop]:
            raise SystemExit(f"{dst}: kept entry at {e.at:#x} differs from the original")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--arch", type=int, default=90, help="compute capability to keep, as 90 for sm_90")
    args = p.parse_args()
    tally = strip(Path(args.src), Path(args.dst), args.arch)
    print(f"{args.dst}: " + ", ".join(f"{k} {v}" for k, v in sorted(tally.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
