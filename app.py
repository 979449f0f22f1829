"""NuDiff Studio: `python app.py [--host 127.0.0.1] [--port 7860] [--share] [--auth user:pass] [--work-dir DIR]
[--max-memory-gb N] [--precision auto|fp32]`."""

from __future__ import annotations

import argparse
import logging
import sys

from engine.precision import PRECISIONS
from nudiff_app import build_app, launch
from nudiff_app.ui import default_work_dir


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="NuDiff Studio: augment a labeled nuclei dataset with diffusion models")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--share", action="store_true", help="also open a public Gradio share link (use with --auth)")
    ap.add_argument("--auth", default=None, metavar="USER:PASS", help="require this login")
    ap.add_argument("--work-dir", default=None,
                    help=f"folder for uploads, training runs, sessions and exports (default {default_work_dir()})")
    ap.add_argument("--structure-checkpoint", default=None, help="default structure model (default: the demo)")
    ap.add_argument("--image-checkpoint", default=None, help="default image model (default: the demo)")
    ap.add_argument("--max-memory-gb", type=float, default=None,
                    help="memory budget of one sampling job in GiB: larger requests are refused before they start, "
                         "and a job that grows past it is stopped without taking the studio down "
                         "(default: 40%% of this machine's RAM, or NUDIFF_MAX_MEMORY_GB)")
    ap.add_argument("--precision", default="auto", choices=PRECISIONS,
                    help="what sampling computes in: auto, bf16 autocast where it is fast (a GPU, a CPU with native "
                         "bf16), else fp32; fp32: always fp32, the same bits as the CLI's --precision fp32 on this "
                         "machine (default: %(default)s)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    auth = None
    if args.auth:
        user, sep, password = args.auth.partition(":")
        if not sep or not user or not password:
            print("error: --auth expects USER:PASS", file=sys.stderr)
            return 2
        auth = (user, password)
    if args.share and not auth:
        print("warning: --share without --auth makes the app public to anyone with the link", file=sys.stderr)
    if args.max_memory_gb is not None and not args.max_memory_gb > 0:
        print("error: --max-memory-gb must be a positive number", file=sys.stderr)
        return 2
    demo = build_app(args.work_dir, structure_checkpoint=args.structure_checkpoint,
                     image_checkpoint=args.image_checkpoint, max_memory_gb=args.max_memory_gb,
                     precision=args.precision)
    launch(demo, host=args.host, port=args.port, share=args.share, auth=auth)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
