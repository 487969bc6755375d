"""The real server on a free localhost port: answers, limits, the web page in Chromium, and
what it needs on a network: a token, HTTPS, metrics, an access log, a bounded queue and a
deadline for slow clients."""
import asyncio
import datetime
import ipaddress
import json
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client.parser import text_string_to_metric_families

import cnnkit
import cnnkit.serve
from cnnkit.cli import main

TOKEN = "a-token-for-the-tests"
TIMEOUT = 3  # the module server's --request-timeout and --keep-alive-timeout, in seconds


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(png_run):
    proc, url = _start(png_run.run_dir, "--max-upload-mb", "1", "--request-timeout",
                       str(TIMEOUT), "--keep-alive-timeout", str(TIMEOUT))
    yield url
    proc.terminate()
    proc.wait(timeout=600)


def _self_signed(folder):
    """A self-signed certificate for 127.0.0.1 and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return folder / "cert.pem", folder / "key.pem"


@pytest.fixture(scope="module")
def secure(png_run, tmp_path_factory):
    """A server with a token, HTTPS on a self-signed certificate, and an access log; its
    URL, the TLS context that trusts that certificate, and the log's path."""
    folder = tmp_path_factory.mktemp("secure")
    cert, key = _self_signed(folder)
    (folder / "token").write_text(TOKEN + "\n")
    trust = ssl.create_default_context(cafile=str(cert))
    proc, url = _start(png_run.run_dir, "--token-file", folder / "token", "--tls-cert", cert,
                       "--tls-key", key, "--access-log", folder / "access.jsonl",
                       scheme="https", verify=trust)
    yield url, trust, folder / "access.jsonl"
    proc.terminate()
    proc.wait(timeout=600)


def _start(run_dir, *flags, scheme="http", verify=True):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cnnkit", "serve", str(run_dir), "--port",
                             str(port), *map(str, flags)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"{scheme}://127.0.0.1:{port}"
    deadline = time.monotonic() + 10 * 60  # an outer limit: a slow machine starts it in seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1, verify=verify).status_code == 200:
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


def _post(url, *files, headers=None, verify=True, **params):
    return httpx.post(f"{url}/predict", params=params, timeout=600, headers=headers,
                      verify=verify, files=[("files", (name, data)) for name, data in files])


def _metrics(url, **kw) -> dict:
    """/metrics read with prometheus-client's own parser: {(sample, labels): value}."""
    r = httpx.get(f"{url}/metrics", timeout=600, **kw)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


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


def test_page_in_headless_chromium_shows_the_apis_top_class(server, secure, png_sample,
                                                            tmp_path):
    """The page shows the API's top class; on a server with a token it asks for the token,
    once: after a reload it still has it."""
    from playwright.sync_api import sync_playwright
    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser_path, "Debian's chromium is needed (make test installs it)"
    image = sorted(png_sample.rglob("*.png"))[3]
    api_top = _post(server, (image.name, image.read_bytes()), top_k=5).json()[0][
        "predictions"][0]["class"]
    secure_url, trust, _ = secure
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        page = browser.new_page()
        page.goto(server + "/")
        assert page.is_hidden("#login")
        page.set_input_files("#file", str(image))
        page.wait_for_selector("#top-class", timeout=600_000)
        shown = page.inner_text("#top-class")
        page.screenshot(path=str(tmp_path / "page.png"))

        page = browser.new_context(ignore_https_errors=True).new_page()  # self-signed
        page.goto(secure_url + "/")
        page.wait_for_selector("#token", state="visible", timeout=600_000)
        page.fill("#token", TOKEN)
        page.click("#use-token")
        page.wait_for_function("document.getElementById('model').textContent"
                               ".includes('classes')", timeout=600_000)  # /model answered
        page.reload()
        page.set_input_files("#file", str(image))
        page.wait_for_selector("#top-class", timeout=600_000)
        shown_with_token = page.inner_text("#top-class")
        asked_again = page.is_visible("#login")
        browser.close()
    assert shown == api_top and shown_with_token == api_top and not asked_again


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


def test_a_token_guards_the_model_over_https_but_not_the_health_probe(secure, png_sample):
    url, trust, _ = secure
    image = sorted(png_sample.rglob("*.png"))[0]
    calls = {"/predict": lambda h: _post(url, (image.name, image.read_bytes()), headers=h,
                                         verify=trust),
             "/model": lambda h: httpx.get(f"{url}/model", headers=h, verify=trust),
             "/metrics": lambda h: httpx.get(f"{url}/metrics", headers=h, verify=trust)}
    for path, call in calls.items():
        for wrong in ({}, {"Authorization": "Bearer nope"}, {"Authorization": TOKEN},
                      {"Authorization": f"Bearer {TOKEN}x"}):
            r = call(wrong)
            assert r.status_code == 401, (path, wrong)
            assert r.headers["www-authenticate"] == "Bearer" and "token" in r.json()["detail"]
        assert call({"Authorization": f"Bearer {TOKEN}"}).status_code == 200, path
    assert httpx.get(f"{url}/healthz", verify=trust).json() == {"status": "ok"}
    assert "<script>" in httpx.get(f"{url}/", verify=trust).text  # the page asks for it
    with pytest.raises(httpx.ConnectError):  # a certificate nobody vouched for
        httpx.get(f"{url}/healthz")
    with pytest.raises(httpx.HTTPError):  # nothing in clear text
        httpx.get(url.replace("https:", "http:") + "/healthz")


def test_metrics_count_what_was_sent_and_the_access_log_has_a_line_each(secure, png_sample):
    url, trust, access_log = secure
    auth = {"headers": {"Authorization": f"Bearer {TOKEN}"}, "verify": trust}
    images = [p.read_bytes() for p in sorted(png_sample.rglob("*.png"))[:4]]
    before = _metrics(url, **auth)
    lines_before = len(access_log.read_text().splitlines())
    for files in ([images[0]], [images[1]], [images[2], images[3]]):
        assert _post(url, *[(f"{i}.png", b) for i, b in enumerate(files)], **auth
                     ).status_code == 200
    assert _post(url, ("notes.png", b"just text"), **auth).status_code == 415
    assert _post(url, ("0.png", images[0]), verify=trust).status_code == 401
    after = _metrics(url, **auth)

    def grew(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)
    assert grew("cnnkit_requests_total", route="/predict", status="200") == 3
    assert grew("cnnkit_requests_total", route="/predict", status="415") == 1
    assert grew("cnnkit_requests_total", route="/predict", status="401") == 1
    assert grew("cnnkit_requests_total", route="/metrics", status="200") == 1  # `before`
    assert grew("cnnkit_request_duration_seconds_count", route="/predict") == 5
    assert grew("cnnkit_images_total") == 4 and grew("cnnkit_batch_images_sum") == 4
    assert 1 <= grew("cnnkit_batch_images_count") <= 3  # forward passes
    assert after[("cnnkit_queue_images", ())] == 0
    assert after[("process_resident_memory_bytes", ())] > 0

    lines = [json.loads(line) for line in access_log.read_text().splitlines()[lines_before:]]
    predicts = [x for x in lines if x["route"] == "/predict"]
    assert [(x["status"], x["images"]) for x in predicts] == \
        [(200, 1), (200, 1), (200, 2), (415, 1), (401, None)]
    assert all(x["batch"] >= x["images"] for x in predicts if x["status"] == 200)
    assert all(x["client"] == "127.0.0.1" and x["ms"] > 0 and x["method"] == "POST"
               for x in predicts)
    assert len(access_log.read_bytes()) < 300 * len(access_log.read_text().splitlines())


def test_past_max_queue_images_the_server_answers_503_with_retry_after(png_run, png_sample):
    """A request of 3 images is let in alone though the queue holds 2; while its forward pass
    is held, another request is turned away with 503, answered after half its reject delay
    at least; once the first is answered, one is let in."""
    lm = cnnkit.load(png_run.run_dir)
    release = threading.Event()
    release.set()

    class Held(torch.nn.Module):  # the model, waiting to be released before each pass
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            release.wait()
            return self.model(x)
    lm.model = Held(lm.model)
    app = cnnkit.serve.create_app(lm, device="cpu", max_queue=2, reject_delay=0.4)
    release.clear()
    images = [("a.png", p.read_bytes()) for p in sorted(png_sample.rglob("*.png"))[:3]]

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://cnnkit", timeout=600) as client:
            def post(files):
                return client.post("/predict", files=[("files", f) for f in files])
            async def queued() -> float:
                text = (await client.get("/metrics")).text
                return float(re.search(r"^cnnkit_queue_images (\S+)$", text, re.M)[1])
            first = asyncio.create_task(post(images))
            while await queued() < 3 and not first.done():
                await asyncio.sleep(0.01)  # until the first request is in
            sent = time.perf_counter()
            busy = asyncio.create_task(post(images[:1]))
            while not busy.done() and await queued() < 4:
                await asyncio.sleep(0.01)  # until it is answered, or (wrongly) let in
            held = time.perf_counter() - sent
            release.set()
            return await first, await busy, held, await post(images[:2])
    first, busy, held, later = asyncio.run(scenario())
    app.state.batcher.close()
    assert first.status_code == 200 and len(first.json()) == 3
    assert busy.status_code == 503 and busy.headers["retry-after"] in {"1", "2", "3"}
    assert held >= 0.2  # a lower bound: a timer never fires early
    assert "busy" in busy.json()["detail"] and "3 images are waiting" in busy.json()["detail"]
    assert later.status_code == 200 and len(later.json()) == 2


def test_slow_clients_are_closed_without_a_place_in_the_queue(server, png_sample):
    """A request whose headers, or body, do not arrive within --request-timeout gets 408 and
    its connection is closed; so is a connection that sends nothing; an idle keep-alive
    connection is closed after --keep-alive-timeout. Meanwhile others are served."""
    port = int(server.rsplit(":", 1)[1])
    image = sorted(png_sample.rglob("*.png"))[0].read_bytes()
    body = (b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"x.png\""
            b"\r\nContent-Type: image/png\r\n\r\n" + image + b"\r\n--b--\r\n")
    before = _metrics(server)
    start = time.monotonic()
    sockets = {name: socket.create_connection(("127.0.0.1", port), timeout=600)
               for name in ("headers", "body", "nothing", "kept")}
    sockets["headers"].sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multi")
    sockets["body"].sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/"
                            b"form-data; boundary=b\r\nContent-Length: %d\r\n\r\n" %
                            len(body) + body[:40])
    sockets["kept"].sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert _post(server, ("x.png", image)).status_code == 200  # others are served meanwhile
    assert _metrics(server)[("cnnkit_queue_images", ())] == 0  # and nothing waits in line

    def until_closed(s) -> bytes:
        answer = b""
        while chunk := s.recv(65536):  # the socket's 600 s: an outer limit only
            answer += chunk
        s.close()
        return answer
    answers = {name: until_closed(s) for name, s in sockets.items()}
    assert time.monotonic() - start >= TIMEOUT * 0.9
    for name in ("headers", "body", "nothing"):
        assert answers[name].startswith(b"HTTP/1.1 408 "), name
        assert b"connection: close" in answers[name] and b"--request-timeout" in answers[name]
    assert answers["kept"].startswith(b"HTTP/1.1 200 ") and answers["kept"].endswith(b'"ok"}')
    after = _metrics(server)
    assert after[("cnnkit_request_timeouts_total", ())] - \
        before[("cnnkit_request_timeouts_total", ())] == 3


def test_other_machines_need_a_token_and_bad_settings_get_one_line(png_run, tmp_path, capsys,
                                                                   monkeypatch):
    run = str(png_run.run_dir)
    empty = tmp_path / "token"
    empty.write_text("\n")
    for flags, words in [(["--host", "0.0.0.0"], "--no-token"),
                         (["--host", "example.org"], "--token-file"),
                         (["--token-file", str(empty)], "holds no token"),
                         (["--token-file", str(tmp_path / "missing")], "cannot be read"),
                         (["--tls-cert", str(empty)], "both --tls-cert and --tls-key"),
                         (["--tls-cert", str(empty), "--tls-key", str(empty)], "not a cert"),
                         (["--max-queue", "0"], "at least 1"),
                         (["--request-timeout", "0"], "more than 0"),
                         (["--reject-delay", "-1"], "0 or more"),
                         (["--access-log", str(tmp_path / "no" / "such" / "log")],
                          "cannot be written")]:
        assert main(["serve", run, "--port", str(_free_port()), *flags]) == 2, flags
        err = capsys.readouterr().err
        assert err.startswith("cnnkit: error: ") and err.count("\n") == 1 and words in err, err
    monkeypatch.setenv("CNNKIT_TOKEN", "from-the-environment")
    assert cnnkit.serve.read_token(None) == "from-the-environment"
    (tmp_path / "given").write_text(" from-a-file\n")
    assert cnnkit.serve.read_token(tmp_path / "given") == "from-a-file"
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert cnnkit.serve.is_loopback(host)
    assert not any(map(cnnkit.serve.is_loopback, ("0.0.0.0", "::", "10.1.2.3", "host.lan")))
