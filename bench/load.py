"""The studio under simultaneous sessions: each samples, synthesizes and fills its own basket.

    python bench/load.py [--sessions 4] [--steps 4] [--demo]

Launches the studio in this process (tiny stand-in models, or the demo models with --demo) and drives it
with N gradio_client sessions at once. Each session samples structures with its own seed, sends one to
Synthesize, synthesizes two variants and adds them to its basket. Checks that every session got its own
results and basket (no leakage), and prints the requests, wall time and the peak resident memory of the
server and of its worker process. Prints figures; exits 1 if a session saw another's work.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def session(url: str, k: int, s_ckpt: str, i_ckpt: str, steps: int, out: dict) -> None:
    from gradio_client import Client

    c = Client(url, verbose=False)
    requests = 0
    seed = 1000 * (k + 1)
    status, gallery = c.predict(s_ckpt, 2, "ddim", steps, seed, api_name="/sample_structures")
    requests += 1
    c.predict(1, api_name="/send_to_synthesize")
    requests += 1
    status2, results = c.predict(i_ckpt, 2.0, "ddim", steps, seed, 2, api_name="/synthesize")
    requests += 1
    add = c.predict(0, 0.8, api_name="/add_all_to_basket")
    requests += 1
    out[k] = {"sample_status": status, "captions": [g["caption"] for g in gallery], "synth_status": status2,
              "results": [r["caption"] for r in results], "basket": add[0], "requests": requests}


def run(n: int, steps: int, demo: bool) -> int:
    from engine.demo import default_checkpoints, standin_checkpoints
    from nudiff_app import build_app, launch

    s_ckpt, i_ckpt = map(str, default_checkpoints() if demo else standin_checkpoints())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    work = Path(tempfile.mkdtemp(prefix="nudiff-load-"))
    app = build_app(work, structure_checkpoint=s_ckpt, image_checkpoint=i_ckpt)
    launch(app, port=port, prevent_thread_lock=True, quiet=True)
    ctx = app.nudiff
    import os

    peak = {"server": 0, "worker": 0}
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak["server"] = max(peak["server"], _rss(os.getpid()))
            if ctx._worker is not None and ctx._worker.pid:
                peak["worker"] = max(peak["worker"], _rss(ctx._worker.pid))
            time.sleep(0.1)

    threading.Thread(target=watch, daemon=True).start()
    url = f"http://127.0.0.1:{port}/"
    out: dict = {}
    t0 = time.perf_counter()
    threads = [threading.Thread(target=session, args=(url, k, s_ckpt, i_ckpt, steps, out)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    done.set()
    ok = len(out) == n
    for k, r in sorted(out.items()):
        seed = 1000 * (k + 1)
        mine = (all(f"seed {seed}" in cap or f"seed {seed + 1}" in cap for cap in r["captions"])
                and [f"#{v} · seed {seed + v}" for v in range(2)] == r["results"]
                and "pair_0001, pair_0002" in r["basket"] and "(2 pairs:" in r["basket"])
        ok &= mine
        print(f"session {k}: {r['requests']} requests, structures {r['captions']}, images {r['results']}, "
              f"basket: {r['basket']} -> {'own work only' if mine else 'LEAK OR FAILURE'}")
    reqs = sum(r["requests"] for r in out.values())
    print(f"\n{n} sessions, {reqs} requests, {wall:.1f} s wall, peak RSS server {peak['server'] / 2**30:.2f} GiB, "
          f"worker {peak['worker'] / 2**30:.2f} GiB (budget {ctx.max_memory_gb:.1f} GiB per job)")
    ctx.close()
    app.close()
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--demo", action="store_true", help="the embedded demo models (default: tiny stand-ins)")
    args = ap.parse_args(argv)
    return run(args.sessions, args.steps, args.demo)


if __name__ == "__main__":
    raise SystemExit(main())
