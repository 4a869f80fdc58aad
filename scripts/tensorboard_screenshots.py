"""Screenshots of the TensorBoard pages of a run, taken in a real browser (headless Chromium), so that what
a newcomer sees after `make demo` can be checked and shown: docs/tensorboard/*.png.

    python scripts/tensorboard_screenshots.py                     # trains configs/smoke.yaml + the two
                                                                  # presets into a temp folder first
    python scripts/tensorboard_screenshots.py --logdir runs/      # an existing run folder
    python scripts/tensorboard_screenshots.py --out /tmp/shots

Needs chromium (Debian: apt-get install chromium) and tensorboard (in the venv). TensorBoard is served on
127.0.0.1 at a free port and stopped afterwards. Pages: the custom-scalars "Phase transition" page, the
time-series page, the TEXT tab (answers tables, phase/transitions).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGES = {  # file name -> URL fragment of TensorBoard's single-page app
    "custom_scalars": "#custom_scalars",
    "time_series": "#timeseries",
    "text": "#text",
}
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(root: Path) -> Path:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "em_lightning.cli", "fit", "--config", "configs/smoke.yaml", "--config",
           "configs/callbacks/phase_transition.yaml", "--config", "configs/callbacks/demo_eval.yaml",
           "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root)]
    subprocess.run(cmd, cwd=REPO, env=env, check=True)
    return root


def _wait(url: str, seconds: float = 60) -> None:
    end = time.time() + seconds
    while time.time() < end:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"TensorBoard did not answer at {url}")


def shoot(logdir: Path, out: Path, width: int = 1400, height: int = 2200, wait_ms: int = 20000) -> list[Path]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium not found (Debian: apt-get install chromium)")
    port = _free_port()
    tb = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
                           "--port", str(port), "--reload_interval", "0"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    written = []
    try:
        base = f"http://127.0.0.1:{port}/"
        _wait(base + "data/logdir")
        time.sleep(3)  # the first load of the event files
        out.mkdir(parents=True, exist_ok=True)
        for name, fragment in PAGES.items():
            path = out / f"{name}.png"
            with tempfile.TemporaryDirectory() as profile:
                subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                                f"--virtual-time-budget={wait_ms}", f"--screenshot={path}", base + fragment],
                               check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=180)
            written.append(path)
            print(f"{path}")
    finally:
        tb.terminate()
        tb.wait(timeout=30)
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--logdir", type=Path, help="a TensorBoard log folder (default: train the smoke demo first)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "tensorboard", help="where the PNGs go")
    args = p.parse_args()
    if args.logdir is not None:
        shoot(args.logdir, args.out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        shoot(_train(Path(tmp)), args.out)


if __name__ == "__main__":
    main()
