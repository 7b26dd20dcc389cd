"""What the HTTP server costs the webhook: servers that answer every review with the same fixed
AdmissionReview (~4.8 kB, as an injection's), run under bench/webhook_bench.py's keep-alive burst.

  aiohttp   aiohttp's low-level server (web.Server), as webhook/server.py served /mutate until ac9cc5e
  uvicorn   uvicorn with its httptools protocol and a bare ASGI callable (no framework)
  protocol  an asyncio.Protocol with httptools' parser writing the answer itself: no limits, no timeouts,
            no ordering; the floor
  webhook   webhook/server.py's App and serving (uvicorn, bounded head and body), one route returning the answer

All parse the review with orjson and run on uvloop over TLS; they differ only in the HTTP layer, so the
difference in server CPU per review is what each HTTP layer costs. The webhook's own work on a reused
answer (parse, facts, cache lookup, encoding, metrics) comes on top of the `webhook` figure.

Usage: .venv/bin/python bench/webhook_http_floor.py [--rounds 8] [--repeat 2] [--smoke]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Each is run as `python -m webhook serve ...` from its own directory (webhook_bench.py's --server-src).
COMMON = '''
import argparse, base64, json, ssl, sys
import orjson, uvloop

def settings():
    p = argparse.ArgumentParser()
    p.add_argument("command")
    for flag in ("--config", "--tls-cert", "--tls-key", "--host", "--shutdown-delay"):
        p.add_argument(flag)
    p.add_argument("--port", type=int)
    a = p.parse_args()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(a.tls_cert, a.tls_key)
    ctx.num_tickets = 1
    return a, ctx

PATCH = base64.b64encode(b"x" * 3500).decode()

def answer(body):
    uid = orjson.loads(body)["request"]["uid"]
    response = {"uid": uid, "allowed": True, "patchType": "JSONPatch", "patch": PATCH}
    return orjson.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response})

def listening(port):
    print(f'event=listening address=["127.0.0.1", {port}]', file=sys.stderr, flush=True)
'''

SERVERS = {
    "aiohttp": COMMON + '''
import asyncio
from aiohttp import web

async def main():
    a, ctx = settings()
    async def handle(request):
        return web.Response(body=answer(await request.read()), content_type="application/json")
    runner = web.ServerRunner(web.Server(handle, access_log=None))
    await runner.setup()
    site = web.TCPSite(runner, a.host, a.port, ssl_context=ctx, backlog=1024)
    await site.start()
    listening(site._server.sockets[0].getsockname()[1])
    await asyncio.Event().wait()

uvloop.run(main())
''',
    "protocol": COMMON + '''
import asyncio
import httptools

class Http(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.parser, self.chunks = transport, httptools.HttpRequestParser(self), []
    def data_received(self, data):
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()
    def on_body(self, body):
        self.chunks.append(body)
    def on_message_complete(self):
        out, self.chunks = answer(b"".join(self.chunks)), []
        keep = self.parser.should_keep_alive()
        head = b"HTTP/1.1 200 OK\\r\\nContent-Type: application/json\\r\\nContent-Length: %d\\r\\n" % len(out)
        self.transport.write(head + (b"" if keep else b"Connection: close\\r\\n") + b"\\r\\n" + out)
        if not keep:
            self.transport.close()

async def main():
    a, ctx = settings()
    server = await asyncio.get_running_loop().create_server(Http, a.host, a.port, ssl=ctx, backlog=1024)
    listening(server.sockets[0].getsockname()[1])
    await asyncio.Event().wait()

uvloop.run(main())
''',
    "uvicorn": COMMON + '''
import asyncio
import uvicorn

async def app(scope, receive, send):
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    out = answer(b"".join(chunks))
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": out})

async def main():
    a, _ = settings()
    config = uvicorn.Config(
        app, host=a.host, port=a.port, ssl_certfile=a.tls_cert, ssl_keyfile=a.tls_key, http="httptools",
        loop="none", lifespan="off", access_log=False, log_level="warning", backlog=1024,
    )
    config.load()
    config.ssl.num_tickets = 1
    server = uvicorn.Server(config)
    serving = asyncio.ensure_future(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    listening(server.servers[0].sockets[0].getsockname()[1])
    await serving

uvloop.run(main())
''',
    "webhook": COMMON + '''
import asyncio
from webhook.server import App, Response, serving

async def mutate(request):
    return Response(200, answer(request.body), "application/json")

async def main():
    a, ctx = settings()
    async with serving(App({"/mutate": {"POST": mutate}}), host=a.host, port=a.port, ssl_context=ctx) as bound:
        listening(bound[1])
        await asyncio.Event().wait()

uvloop.run(main())
''',
}
ORDER = ("aiohttp", "uvicorn", "webhook", "protocol")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--repeat", type=int, default=2, help="runs of each server, alternating")
    p.add_argument("--concurrency", type=int, default=200)
    p.add_argument("--smoke", action="store_true", help="one small unpinned round of each, to check the harness")
    args = p.parse_args()
    pinning = ["--quiet-wait", "30"]
    if args.smoke:
        args.rounds, args.repeat, args.concurrency = 1, 1, 6
        pinning = ["--quiet-wait", "0", "--server-cpu", "-1", "--client-cpu", "-1"]
    with tempfile.TemporaryDirectory() as tmp:
        for name, source in SERVERS.items():
            package = Path(tmp) / name / "webhook"
            shutil.copytree(REPO / "webhook", package, ignore=shutil.ignore_patterns("__pycache__"))
            (package / "__main__.py").write_text(source)
        for _ in range(args.repeat):
            for name in ORDER:
                done = subprocess.run(
                    [
                        sys.executable, str(REPO / "bench" / "webhook_bench.py"), "--shapes", "keep-alive",
                        "--rounds", str(args.rounds), "--concurrency", str(args.concurrency), *pinning,
                        "--server-src", str(Path(tmp) / name),
                    ],
                    cwd=REPO, capture_output=True, text=True, timeout=600, check=True,
                )
                line = next(ln for ln in done.stdout.splitlines() if ln.startswith("keep-alive"))
                print(f"{name:9s} {line}", flush=True)


if __name__ == "__main__":
    main()
