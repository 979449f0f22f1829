"""Idle cost of the studio: CPU seconds its server process burns with nobody connected, and with one browser.

    python bench/idle_cost.py

Starts `python app.py` twice (Gradio's queue polling every 1 ms, then the studio's 50 ms) on a free port with the tiny stand-in models (NUDIFF_TEST_MODELS=1), measures the
server's CPU time (utime + stime from /proc) over 20 s before any browser, 10 s with one headless Chromium
page open (the Train tab polls every 2 s), and 20 s after it closed. Prints figures; no pass/fail.
"""

import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu(pid: int) -> float:
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def run(poll: str) -> None:
    print(f"\n## queue poll interval {poll} s" + (" (Gradio's default)" if poll == "0.001" else " (the studio's)"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"nudiff-idle-{port}"
    env = dict(os.environ, NUDIFF_TEST_MODELS="1", NUDIFF_IDLE_POLL_S=poll)
    p = subprocess.Popen([str(ROOT / ".venv/bin/python"), "app.py", "--port", str(port), "--work-dir", str(work)],
                         cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(1)
        time.sleep(5)

        def measure(label: str, secs: float) -> None:
            c0 = cpu(p.pid)
            time.sleep(secs)
            print(f"{label}: {cpu(p.pid) - c0:.2f} s CPU in {secs:.0f} s")

        measure("idle, no browser yet", 20)
        from playwright.sync_api import sync_playwright

        with sync_playwright() as pw:
            b = pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                   args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            pg = b.new_page()
            pg.goto(url)
            pg.locator("#st-sample").wait_for(timeout=60000)
            measure("one browser page open", 10)
            b.close()
        time.sleep(3)
        measure("idle, after the browser closed", 20)
    finally:
        p.terminate()
        p.wait(10)


def main() -> None:
    for poll in ("0.001", "0.05"):
        run(poll)


if __name__ == "__main__":
    main()
