"""Instructions per HPACK operation under callgrind: the figures quoted in the codec commits of issue #14.

Run: `python -m bench.codec_instructions` (it re-runs itself under valgrind). Sections, each per operation:
encode a grpc-go request list whose deadline, trace and request id vary; decode our encoder's block of it;
decode the `hpack` library's block of it (incremental indexing and Huffman, as grpc-go sends); decode a block
of 7 indexed fields with the memo off; build the Huffman decoding tables (once). Measures only.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

N = 2000
SECTIONS = ("encode varying list", "decode our block", "decode grpc-go block", "decode 7 indexed, no memo",
            "build Huffman tables (total)")


def _sections() -> None:
    import hpack

    from bench.loadgen import request_headers
    from sidecar.h2 import huffman
    from sidecar.h2.hpack import Decoder, Encoder

    rng = random.Random(1)
    lists = [request_headers("arith.default:50051", "/arith.Arith/Add", vary=True, rng=rng) for _ in range(N)]
    peer = hpack.Encoder()
    theirs = [peer.encode(h) for h in lists]
    sender = Encoder()  # one connection's encoder: its blocks are what the next hop decodes, in order
    ours = [sender.encode(h) for h in lists]

    class NoMemo(dict[bytes, object]):
        def __setitem__(self, key: bytes, value: object) -> None:
            pass

    enc, d1, d2, d3 = Encoder(), Decoder(), Decoder(), Decoder()
    d3._memo = NoMemo()  # type: ignore[assignment]
    marks = (os.getpgrp, lambda: os.getsid(0))
    marks[0]()
    for h in lists:
        enc.encode(h)
    marks[1]()
    marks[0]()
    for b in ours:
        d1.decode(b)
    marks[1]()
    marks[0]()
    for b in theirs:
        d2.decode(b)
    marks[1]()
    marks[0]()
    for _ in range(N):
        d3.decode(b"\x82\x86\x84\x87\x88\x89\x8a")
    marks[1]()
    marks[0]()
    huffman._build_decoder()
    marks[1]()


def main() -> int:
    if sys.argv[1:] == ["--sections"]:
        _sections()
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cg.out"
        subprocess.run(
            ["valgrind", "--tool=callgrind", "--zero-before=getpgrp", "--dump-before=getsid",
             f"--callgrind-out-file={out}", sys.executable, "-m", "bench.codec_instructions", "--sections"],
            check=True, capture_output=True, env={**os.environ, "PYTHONHASHSEED": "0"},
            cwd=str(Path(__file__).resolve().parent.parent))
        parts = sorted(out.parent.glob("cg.out.*"), key=lambda p: int(p.suffix[1:]))
        for name, part in zip(SECTIONS, parts, strict=False):
            m = re.search(r"^summary: (\d+)", part.read_text(), re.M)
            total = int(m.group(1)) if m else 0
            print(f"{name:32s} {total if 'total' in name else total // N:>12,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
