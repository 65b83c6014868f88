"""Helpers of the HTML page tests: a headless Chromium (screenshot, DOM), a counting HTTP proxy that sees every
request a page makes, an HTML table reader, and synthetic run folders (no training) with known numbers.

Without Chromium the browser tests skip with how to install it; in CI (env CI=true) they fail instead, so CI
always runs them (.ci/run installs Debian's chromium before `make test`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit
from typing import Optional

import numpy as np
import pytest
import yaml
from PIL import Image

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
"""Looked for on PATH in this order: the headless shell (made for automation: no background requests) first."""

BROWSER_SERVICE_HOSTS = ("update.googleapis.com", "clients2.google.com", "accounts.google.com", "redirector.gvt1.com",
                         "optimizationguide-pa.googleapis.com", "safebrowsing.googleapis.com")
"""Hosts a full Chromium calls on its own (update checks, network time, sign-in), whatever the page: not the page's
requests. The headless shell makes none."""

BROWSER_TIMEOUT = 90
"""Seconds one headless Chromium run may take before the test fails (a start takes 1-3 s)."""


# ---------------------------------------------------------------------------- the browser


def find_browser() -> Optional[str]:
    """The first Chromium on PATH (BROWSERS), or None."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def require_browser() -> str:
    """Chromium's path; skips the test plainly when it is missing, or fails it when env CI is true."""
    path = find_browser()
    if path is None:
        reason = ("chromium is missing, so the HTML pages cannot be rendered: install it with "
                  "`apt-get install -y chromium-headless-shell` (or chromium; Debian; .ci/run does it before "
                  "`make test`)")
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(reason + "; CI must run these tests.")
        pytest.skip(reason)
    return path


class CountingProxy:
    """An HTTP proxy on 127.0.0.1 that answers every request with 404 and records it: what a page tried to fetch.
    Chromium is pointed at it with the loopback bypass removed, so no request can go around it."""

    def __init__(self):
        self.requests: list[str] = []
        lock = threading.Lock()
        requests = self.requests

        class Handler(BaseHTTPRequestHandler):
            timeout = 10

            def _record(self):
                with lock:
                    requests.append(f"{self.command} {self.path}")
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.send_header("Connection", "close")
                self.end_headers()

            do_GET = do_POST = do_HEAD = do_PUT = do_OPTIONS = do_CONNECT = _record

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> "CountingProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def page_requests(self) -> list[str]:
        """The recorded requests, less the browser's own calls to BROWSER_SERVICE_HOSTS."""
        return [r for r in self.requests if urlsplit(_target(r)).hostname not in BROWSER_SERVICE_HOSTS]


def _target(request: str) -> str:
    """'GET http://host/path' -> the URL; 'CONNECT host:443' -> https://host:443."""
    method, _, target = request.partition(" ")
    return f"https://{target}" if method == "CONNECT" else target


def _run_browser(page: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """One headless Chromium run on the page (a file:// URL) with a fresh profile and every request through a
    counting proxy: (the finished process, the page's requests)."""
    browser = require_browser()
    with CountingProxy() as proxy, tempfile.TemporaryDirectory(prefix="segtrain-chromium-") as profile:
        command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                   "--hide-scrollbars", "--force-color-profile=srgb", "--force-device-scale-factor=1",
                   "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--disable-sync",
                   "--disable-background-networking", "--disable-component-update", "--disable-default-apps",
                   "--disable-domain-reliability", "--metrics-recording-only", f"--user-data-dir={profile}",
                   f"--proxy-server=http://127.0.0.1:{proxy.port}", "--proxy-bypass-list=<-loopback>", *args,
                   Path(page).resolve().as_uri()]
        result = subprocess.run(command, capture_output=True, text=True, timeout=BROWSER_TIMEOUT,
                                env={**os.environ, "HOME": profile})
    assert result.returncode == 0, f"chromium failed ({result.returncode}):\n{result.stderr[-3000:]}"
    return result, proxy.page_requests()


def page_screenshot(page: Path, out: Path, width: int = 1280, height: int = 2400) -> tuple[np.ndarray, list[str]]:
    """(the page rendered in a width x height window as an H x W x 3 uint8 array, the page's requests)."""
    _, requests = _run_browser(page, f"--screenshot={out}", f"--window-size={width},{height}")
    return np.asarray(Image.open(out).convert("RGB")), requests


def page_dom(page: Path) -> tuple[str, list[str]]:
    """(the page's DOM after Chromium loaded it, serialised; the page's requests)."""
    result, requests = _run_browser(page, "--dump-dom")
    return result.stdout, requests


# ---------------------------------------------------------------------------- reading pages


class _Tables(HTMLParser):
    """Every <table id=...> as a list of rows of cell texts (header row included); the page's text."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.text: list[str] = []
        self._table: Optional[list] = None
        self._cell: Optional[list] = None
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("style", "script", "title"):
            self._skip += 1
        elif tag == "table":
            self._table = self.tables.setdefault(dict(attrs).get("id") or f"table{len(self.tables)}", [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("style", "script", "title"):
            self._skip -= 1
        elif tag in ("td", "th") and self._cell is not None and self._table:
            self._table[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._skip:
            return
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def read_page(dom: str) -> tuple[dict, str]:
    """({table id: rows of cell texts}, the visible text with whitespace collapsed) of a page's DOM."""
    parser = _Tables()
    parser.feed(dom)
    return parser.tables, " ".join(" ".join(parser.text).split())


def colour_pixels(picture: np.ndarray, rgb, tolerance: int = 6) -> int:
    """How many pixels of an H x W x 3 picture are within `tolerance` of the colour `rgb` in every channel."""
    return int(np.all(np.abs(picture.astype(int) - np.asarray(rgb)) <= tolerance, axis=-1).sum())


# ---------------------------------------------------------------------------- synthetic run folders


def class_figures(cm: np.ndarray) -> dict:
    """Per-class IoU, Dice, precision, recall, support of a confusion matrix (rows true), by hand in NumPy."""
    cm = np.asarray(cm, dtype=np.float64)
    tp, support, predicted = np.diag(cm), cm.sum(axis=1), cm.sum(axis=0)
    out = []
    for c in range(len(cm)):
        union = support[c] + predicted[c] - tp[c]
        out.append({"iou": tp[c] / union if union else None,
                    "dice": 2 * tp[c] / (support[c] + predicted[c]) if union else None,
                    "precision": tp[c] / predicted[c] if predicted[c] else None,
                    "recall": tp[c] / support[c] if support[c] else None,
                    "support": int(support[c]), "present": bool(union)})
    return out


def solid_png(path: Path, rgb, size=(320, 160)) -> Path:
    """A one-colour PNG (a picture whose pixels a screenshot can find)."""
    Image.new("RGB", size, tuple(rgb)).save(path)
    return path


def fake_run(folder: Path, classes=("background", "road"), cm=((900, 40), (60, 200)), epochs: int = 3,
             steps_per_epoch: int = 5, config: Optional[dict] = None, budget: Optional[str] = None,
             temperature: float = 0.8, pictures=None, minimal: bool = False) -> Path:
    """A run folder as fit writes one, without training: metrics.json from `cm` (figures by hand), history.csv,
    config.yaml, class_stats.json, policy.json, run.json, budget.json with `budget`, and `pictures`
    ({file name: RGB colour}, one-colour PNGs). `minimal`: config.yaml and a bare metrics.json only (an older run)."""
    folder.mkdir(parents=True)
    figures = class_figures(cm)
    ious = [f["iou"] for f in figures if f["iou"] is not None]
    cm_list = [list(map(int, row)) for row in cm]
    metrics = {"per_class": dict(zip(classes, figures)), "mean_iou": float(np.mean(ious)),
               "pixel_accuracy": float(np.trace(np.asarray(cm)) / np.sum(cm)), "confusion_matrix": cm_list,
               "classes": list(classes), "num_pixels": int(np.sum(cm))}
    settings = config or {"data": {"classes": list(classes), "crop": 16, "batch_size": 4},
                          "model": {"depth": 2, "base_filters": 4},
                          "train": {"epochs": epochs, "learning_rate": 0.01, "budget": budget}}
    (folder / "config.yaml").write_text(yaml.safe_dump(settings))
    if not minimal:
        metrics.update(decision={"rule": "argmax", "threshold": None, "cost_matrix": None,
                                 "temperature": temperature, "tta": False, "postprocess": {},
                                 "prior_correction": {"tau": 0.0, "bias": None, "class_weights": None},
                                 "sources": [f"temperature {temperature:.4f} (policy.json, fitted on val)"]},
                       split="val", best_epoch=epochs, post_training_seconds=1.5,
                       worst_images=[{"image": "val_001", "mean_foreground_iou": 0.25}])
        rows = ["epoch,step,loss,lr,seconds,images_per_second,val_loss,val_mean_iou"]
        rows += [f"{e},{e * steps_per_epoch},{1 / e:.6g},0.01,2.5,8,{1.2 / e:.6g},{0.4 + 0.1 * e:.6g}"
                 for e in range(1, epochs + 1)]
        (folder / "history.csv").write_text("\n".join(rows) + "\n")
        counts = np.asarray(cm).sum(axis=1)
        (folder / "class_stats.json").write_text(json.dumps({
            "classes": list(classes), "counts": counts.tolist(), "frequencies": (counts / counts.sum()).tolist(),
            "num_images": 4, "total_pixels": int(counts.sum()), "strategy": "balanced", "max_weight": 10.0,
            "class_weights": [1.0] * len(classes), "warnings": []}))
        (folder / "policy.json").write_text(json.dumps({"model": "best.keras", "calibration": {
            "method": "scalar", "temperature": temperature, "split": "val", "images": 2, "pixels": int(np.sum(cm)),
            "ece_before": 0.1, "ece_after": 0.02}, "tuned": None}))
        (folder / "run.json").write_text(json.dumps({"in_channels": 3, "num_classes": len(classes)}))
        if budget is not None:
            (folder / "budget.json").write_text(json.dumps({"budget": budget, "budget_seconds": 60.0,
                                                            "total_steps": epochs * steps_per_epoch}))
    (folder / "metrics.json").write_text(json.dumps(metrics))
    for name, rgb in (pictures or {}).items():
        solid_png(folder / name, rgb)
    return folder
