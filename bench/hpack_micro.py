"""Micro-benchmark of sidecar.h2.hpack against the `hpack` library on typical gRPC header blocks.

Prints microseconds per call; bounded in iterations (ROUNDS x ITERATIONS per case), no I/O besides stdout.
Run: .venv/bin/python bench/hpack_micro.py [--iterations N] [--rounds R]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import hpack
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.huffman_table import decode_huffman

from sidecar.h2 import huffman
from sidecar.h2.hpack import Decoder, Encoder

Headers = list[tuple[bytes, bytes]]
Coder = TypeVar("Coder")
T = TypeVar("T")

REQUEST: Headers = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/arith.Arith/Add"),
    (b":authority", b"arith:50051"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
    (b"user-agent", b"grpc-python/1.66.1 grpc-c/43.0.0 (linux; chttp2)"),
    (b"grpc-accept-encoding", b"identity, deflate, gzip"),
    (b"grpc-timeout", b"4999921u"),
]
RESPONSE: Headers = [
    (b":status", b"200"),
    (b"content-type", b"application/grpc"),
    (b"grpc-accept-encoding", b"identity, deflate, gzip"),
]
TRAILERS: Headers = [(b"grpc-status", b"0"), (b"grpc-message", b"")]


def with_path(headers: Headers, path: bytes) -> Headers:
    return [(n, path if n == b":path" else v) for n, v in headers]


def with_timeout(headers: Headers, i: int) -> Headers:
    return [(n, b"%du" % (4_999_000 - i) if n == b"grpc-timeout" else v) for n, v in headers]


def best_of(rounds: int, iterations: int, make: Callable[[], Callable[[], None]]) -> float:
    """Microseconds per call: the fastest of `rounds` runs of `iterations` calls (the machine is shared,
    so the minimum is the least disturbed figure). `make` prepares a fresh run outside the timing."""
    best = float("inf")
    for _ in range(rounds):
        run = make()
        start = time.perf_counter()
        run()
        best = min(best, (time.perf_counter() - start) / iterations * 1e6)
    return best


def peer_blocks(lists: Sequence[Headers]) -> list[bytes]:
    """Blocks as a gRPC C-core peer sends them: hpack's encoder, Huffman on, one connection."""
    encoder = hpack.Encoder()
    return [encoder.encode(headers) for headers in lists]


def decode_cases(n: int) -> Iterator[tuple[str, list[bytes], list[bytes]]]:
    """(name, warm-up blocks, timed blocks): each timed run decodes its blocks in order on a decoder
    that has decoded the warm-up blocks."""
    first = peer_blocks([REQUEST])
    yield "request, first on connection", [], first * n
    repeated = peer_blocks([REQUEST, REQUEST])
    yield "request, repeated (table warm)", repeated[:1], repeated[1:] * n
    unique = peer_blocks([REQUEST] + [with_path(REQUEST, b"/arith.Arith/Add%08d" % i) for i in range(n)])
    yield "request, unique :path", unique[:1], unique[1:]
    # The hop between two proxies: our Encoder sends grpc-timeout without indexing, so a warm block
    # differs on every call by that literal alone (no memo hit, no table change).
    ours = Encoder()
    timed = [ours.encode(with_timeout(REQUEST, i)) for i in range(n + 1)]
    yield "request, warm, new grpc-timeout", timed[:1], timed[1:]
    response = peer_blocks([RESPONSE, TRAILERS])
    yield "response+trailers, first", [], response * n
    response = peer_blocks([RESPONSE, TRAILERS, RESPONSE, TRAILERS])
    yield "response+trailers, repeated", response[:2], response[2:] * n


def encode_cases(n: int) -> Iterator[tuple[str, list[Headers], list[Headers]]]:
    yield "request, first on connection", [], [REQUEST] * n
    yield "request, repeated (table warm)", [REQUEST], [REQUEST] * n
    yield (
        "request, unique :path",
        [REQUEST],
        [with_path(REQUEST, b"/arith.Arith/Add%08d" % i) for i in range(n)],
    )
    yield "request, warm, new grpc-timeout", [REQUEST], [with_timeout(REQUEST, i) for i in range(n)]
    yield "response+trailers, first", [], [RESPONSE, TRAILERS] * n
    yield "response+trailers, repeated", [RESPONSE, TRAILERS], [RESPONSE, TRAILERS] * n


def time_sequence(
    rounds: int,
    n: int,
    make: Callable[[], Coder],
    call: Callable[[Coder, T], object],
    warm: Sequence[T],
    items: Sequence[T],
    fresh: bool,
) -> float:
    """Microseconds per call of `call` over `items` (len(items) // n items per call), in order, on a
    coder that has processed `warm` first; with `fresh`, each call gets a new coder."""
    per_call = len(items) // n

    def prepare() -> Callable[[], None]:
        coders = [make() for _ in range(n)] if fresh else [make()] * n
        for item in warm:
            call(coders[0], item)

        def run() -> None:
            for i, item in enumerate(items):
                call(coders[i // per_call], item)

        return run

    return best_of(rounds, n, prepare)


def ours_decode(decoder: Decoder, block: bytes) -> object:
    return decoder.decode(block)


def hpack_decode(decoder: hpack.Decoder, block: bytes) -> object:
    return decoder.decode(block, raw=True)


def ours_encode(encoder: Encoder, headers: Headers) -> object:
    return encoder.encode(headers)


def hpack_encode(encoder: hpack.Encoder, headers: Headers) -> object:
    return encoder.encode(headers)


def report(kind: str, name: str, ours: float, theirs: float) -> None:
    print(f"{kind} {name:32} ours {ours:7.2f} us   hpack {theirs:7.2f} us   x{theirs / ours:5.1f}")


def run_decode(rounds: int, n: int) -> None:
    for name, warm, blocks in decode_cases(n):
        fresh = "first" in name
        ours = time_sequence(rounds, n, Decoder, ours_decode, warm, blocks, fresh)
        theirs = time_sequence(rounds, n, hpack.Decoder, hpack_decode, warm, blocks, fresh)
        report("decode", name, ours, theirs)


def run_encode(rounds: int, n: int) -> None:
    for name, warm, lists in encode_cases(n):
        fresh = "first" in name
        ours = time_sequence(rounds, n, Encoder, ours_encode, warm, lists, fresh)
        theirs = time_sequence(rounds, n, hpack.Encoder, hpack_encode, warm, lists, fresh)
        report("encode", name, ours, theirs)


def run_huffman(rounds: int, n: int) -> None:
    """What Huffman coding would cost per string; the Encoder sends raw literals (see hpack.py)."""
    coder = hpack.huffman.HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)
    for label, text in ((":path", b"/arith.Arith/Add00001234"), ("user-agent", REQUEST[6][1])):
        coded = huffman.encode(text)

        def encode_ours(_: None, item: bytes) -> object:
            return huffman.encode(item)

        def decode_ours(_: None, item: bytes) -> object:
            return huffman.decode(item)

        def encode_theirs(_: None, item: bytes) -> object:
            return coder.encode(item)

        def decode_theirs(_: None, item: bytes) -> object:
            return decode_huffman(item)

        def nothing() -> None:
            return None

        name = f"{label} {len(text)}->{len(coded)} bytes"
        report(
            "huff-enc",
            name,
            *(
                time_sequence(rounds, n, nothing, f, [], [text] * n, False)
                for f in (encode_ours, encode_theirs)
            ),
        )
        report(
            "huff-dec",
            name,
            *(
                time_sequence(rounds, n, nothing, f, [], [coded] * n, False)
                for f in (decode_ours, decode_theirs)
            ),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--iterations", type=int, default=2000, help="calls per timed run (max 100000)")
    parser.add_argument(
        "--rounds", type=int, default=7, help="timed runs per case; the best is shown (max 50)"
    )
    args = parser.parse_args()
    n, rounds = min(max(args.iterations, 1), 100_000), min(max(args.rounds, 1), 50)
    print(f"us per header block (response+trailers: per pair), best of {rounds} x {n} calls")
    run_decode(rounds, n)
    run_encode(rounds, n)
    run_huffman(rounds, n)


if __name__ == "__main__":
    main()
