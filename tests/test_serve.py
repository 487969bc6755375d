"""The real server on a free localhost port: answers, limits, and the web page in Chromium."""
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

import cnnkit


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(png_run):
    proc, url = _start(png_run.run_dir, "--max-upload-mb", "1")
    yield url
    proc.terminate()
    proc.wait(timeout=600)


def _start(run_dir, *flags):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cnnkit", "serve", str(run_dir), "--port",
                             str(port), *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10 * 60  # an outer limit: a slow machine starts it in seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()
    raise AssertionError("the server did not start")


def _tcp() -> list[tuple[int, int, str, int]]:
    """This machine's TCP sockets (Linux /proc/net/tcp): local port, remote port, state
    (01 established, 0A listening) and the bytes received that the owner has not read."""
    rows = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            _, local, remote, state, queues = line.split()[:5]
            rows.append((int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16),
                         state, int(queues.split(":")[1], 16)))
    return rows


def _wait_until(event, proc) -> None:
    deadline = time.monotonic() + 10 * 60  # an outer limit: the event comes in milliseconds
    while not event():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)


def _post(url, *files, **params):
    return httpx.post(f"{url}/predict", params=params, timeout=600,
                      files=[("files", (name, data)) for name, data in files])


def test_predictions_equal_cnnkit_predict(server, png_run, png_sample):
    paths = sorted(png_sample.rglob("*.png"))[:8]
    r = _post(server, *[(p.name, p.read_bytes()) for p in paths], top_k=10)
    assert r.status_code == 200
    local = cnnkit.predict(png_run.run_dir, paths, top_k=10, device="cpu")
    for got, want in zip(r.json(), local):
        assert got["file"] == want["file"].split("/")[-1]
        # Every class's probability (another process, other batches: rounding may reorder
        # near-ties, so classes are compared by name, not by rank). Other batches sum in
        # another order: float32 logits differ by about 1e-6 relative, probabilities (at
        # most 1/4 per unit of logit) by far less than 1e-5.
        got_p = {p["class"]: p["probability"] for p in got["predictions"]}
        want_p = {p["class"]: p["probability"] for p in want["predictions"]}
        assert got_p.keys() == want_p.keys() and len(got_p) == 10
        assert all(got_p[c] == pytest.approx(want_p[c], abs=1e-5) for c in got_p)


def test_model_health_and_schema(server, png_run):
    info = httpx.get(f"{server}/model").json()
    assert info["classes"] == cnnkit.load(png_run.run_dir).classes
    assert info["input_size"] == [3, 32, 32] and 0 <= info["val_accuracy"] <= 1
    assert httpx.get(f"{server}/healthz").json() == {"status": "ok"}
    assert "/predict" in httpx.get(f"{server}/openapi.json").json()["paths"]
    page = httpx.get(f"{server}/").text
    assert "<script>" in page and "http://" not in page and "https://" not in page


def test_limits_answer_with_their_codes_and_the_server_lives_on(server, tmp_path):
    import importlib.util
    from conftest import ROOT
    spec = importlib.util.spec_from_file_location("odd", ROOT / "scripts" / "make_odd_images.py")
    odd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(odd)
    assert _post(server, ("big.png", b"\0" * (2 * 1024 * 1024))).status_code == 413
    r = _post(server, ("notes.jpg", b"just text"))
    assert r.status_code == 415 and "not an image" in r.json()["detail"]
    r = _post(server, ("bomb.png", odd._bomb_png()))
    assert r.status_code == 400 and "decompression bomb" in r.json()["detail"]
    assert _post(server, ("trunc.png", odd._half(odd._png_bytes(odd._gradient(64, 64))))
                 ).status_code == 415
    assert httpx.post(f"{server}/predict").status_code == 422
    bad = httpx.post(f"{server}/predict", content=b"garbage",
                     headers={"content-type": "multipart/form-data; boundary=xx"})
    assert 400 <= bad.status_code < 500
    assert httpx.post(f"{server}/predict?top_k=0",
                      files=[("files", ("a.png", odd._png_bytes(odd._gradient(8, 8))))]
                      ).status_code == 422
    assert httpx.get(f"{server}/healthz").status_code == 200


def test_page_in_headless_chromium_shows_the_apis_top_class(server, png_sample, tmp_path):
    from playwright.sync_api import sync_playwright
    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser_path, "Debian's chromium is needed (make test installs it)"
    image = sorted(png_sample.rglob("*.png"))[3]
    api_top = _post(server, (image.name, image.read_bytes()), top_k=5).json()[0][
        "predictions"][0]["class"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        page = browser.new_page()
        page.goto(server + "/")
        page.set_input_files("#file", str(image))
        page.wait_for_selector("#top-class", timeout=600_000)
        shown = page.inner_text("#top-class")
        page.screenshot(path=str(tmp_path / "page.png"))
        browser.close()
    assert shown == api_top


def test_concurrent_requests_share_forward_passes_and_sigterm_finishes_them(png_run,
                                                                           png_sample):
    """Requests sent together are batched (fewer forward passes than images) and answered
    as they are alone; SIGTERM with a request half-sent lets it finish, then exits 0."""
    paths = sorted(png_sample.rglob("*.png"))[:32]
    alone = {r["file"].split("/")[-1]: r for r in
             cnnkit.predict(png_run.run_dir, paths, top_k=10, device="cpu", batch_size=1)}
    proc, url = _start(png_run.run_dir, "--max-wait-ms", "20")
    try:
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda p: _post(url, (p.name, p.read_bytes()), top_k=10),
                                    paths))
        for r in answers:
            assert r.status_code == 200
            got = r.json()[0]
            # batched against alone: another summation order (see above), within 1e-5
            want = {p["class"]: p["probability"] for p in alone[got["file"]]["predictions"]}
            assert {p["class"] for p in got["predictions"]} == want.keys()
            assert all(p["probability"] == pytest.approx(want[p["class"]], abs=1e-5)
                       for p in got["predictions"])

        # a request whose body is still arriving when SIGTERM comes
        image = paths[0].read_bytes()
        body = (b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"x.png\""
                b"\r\nContent-Type: image/png\r\n\r\n" + image + b"\r\n--b--\r\n")
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=600) as s:
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data;"
                      b" boundary=b\r\nContent-Length: " + str(len(body)).encode() +
                      b"\r\n\r\n" + body[:40])
            mine = s.getsockname()[1]
            # the server has read the headers and the start of the body: the request is in
            # flight (its end of this connection holds nothing unread)
            _wait_until(lambda: any(local == port and remote == mine and state == "01" and
                                    unread == 0 for local, remote, state, unread in _tcp()),
                        proc)
            proc.send_signal(signal.SIGTERM)
            # the server is stopping (it has closed its listening socket), yet still here
            _wait_until(lambda: not any(local == port and state == "0A"
                                        for local, _, state, _ in _tcp()), proc)
            s.sendall(body[40:])
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200") and b'"class"' in answer
        out, err = proc.communicate(timeout=600)
    finally:
        proc.kill() if proc.poll() is None else None
    assert proc.returncode == 0, err
    images, passes = map(int, re.search(r"(\d+) images answered in (\d+) forward passes",
                                        out).groups())
    assert images == len(paths) + 1 and passes < images, out
