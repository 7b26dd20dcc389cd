"""Runs inside a pod's network namespace (under `ip netns exec`, which gives it a mount namespace of its own):
bind-mounts the container's volumes at their mountPaths, then execs the container's command.

`python -m e2e.cluster.container [--mount SRC:DST[:ro]]... [--workdir DIR] -- ARGV...`. Test infrastructure.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mount", action="append", default=[])
    parser.add_argument("--workdir")
    parser.add_argument("--keep", action="append", default=[], help="a host path that must stay visible")
    parser.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    mounts = [spec.split(":") for spec in args.mount]

    def order(m: list[str]) -> tuple[bool, int]:
        # A mount over a directory that holds another mount's source (an emptyDir at /tmp, say, while the
        # volumes live under /tmp) goes last; otherwise parents before children.
        hides = any(other[0] == m[1] or other[0].startswith(m[1].rstrip("/") + "/") for other in mounts)
        return hides, m[1].count("/")

    # The checkout and its venv are the "image": a volume mounted over an ancestor (an emptyDir at /tmp while
    # the checkout is under /tmp) would hide them. Hold them open now and bind them back after the mounts.
    kept = {path: os.open(path, os.O_PATH | os.O_DIRECTORY) for path in args.keep}
    for src, dst, *mode in sorted(mounts, key=order):
        if not os.path.exists(src):
            sys.exit(f"volume source {src} does not exist")
        if os.path.isdir(src):
            os.makedirs(dst, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if not os.path.exists(dst):
                open(dst, "a").close()
        # `ip netns exec` made every mount a slave of the host's: nothing done here propagates back.
        subprocess.run(["mount", "--bind", src, dst], check=True)
        if mode == ["ro"]:
            subprocess.run(["mount", "-o", "remount,bind,ro", dst], check=True)
    for path, fd in kept.items():
        if any(path == m[1] or path.startswith(m[1].rstrip("/") + "/") for m in mounts):
            os.makedirs(path, exist_ok=True)
            # --no-canonicalize: the kernel follows the fd itself (the path it names is hidden by now).
            subprocess.run(["mount", "--no-canonicalize", "--bind", f"/proc/{os.getpid()}/fd/{fd}", path], check=True)
        os.close(fd)
    if args.workdir:
        os.chdir(args.workdir)
    if not argv:
        sys.exit("no command")
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main()
