"""The Serve app on a real `serve.run` on 127.0.0.1 with the tiny model: edits, LoRAs per request, the
bad-input battery, concurrency and batching, the page in headless Chromium."""

import base64
import io
import os
import socket
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

from tests.conftest import reference_image

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_local, tiny, tiny_loras):
    from ray import serve

    from longcat_ray.serving.app import APP_NAME, build_app
    from longcat_ray.serving.config import ServeConfig

    config = ServeConfig(model=str(tiny.model), lora_root=str(tiny_loras), api_token=TOKEN, default_steps=2,
                         default_area=64 * 64, max_steps=8, max_side=256, max_upload_bytes=1_000_000,
                         max_input_pixels=1_000_000, max_batch_size=4, batch_wait_timeout_s=0.3,
                         max_loras_per_replica=1,  # one kept: switching adapters evicts and reads the file again
                         warmup_sizes=["64x48"],  # asked for: a CPU replica warms nothing by default
                         warmup_lora="style0",  # and warms with style0 on, then off
                         max_queued_requests=8,  # 8 edits arriving at once are admitted; a burst of 100 gets 503s
                         upload_timeout_s=5)  # a body still arriving after 5 s: 408
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def post_edit(url: str, image: bytes, headers=AUTH, **fields):
    data = {"prompt": "swap the red and blue colours", "seed": "3", "width": "64", "height": "48", **fields}
    return requests.post(f"{url}/v1/edit", files={"image": ("source.png", image, "image/png")}, data=data,
                         headers=headers, timeout=120)


def pixels(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(response.content)), np.float32)


def test_loras_per_request(server, tiny):
    source = png_bytes(reference_image(tiny))
    base, style0, style1 = (pixels(post_edit(server, source, lora=lora)) for lora in ("", "style0", "style1"))
    assert base.shape == (48, 64, 3)
    for a, b in ((base, style0), (base, style1), (style0, style1)):
        assert np.abs(a - b).max() > 10
    again = pixels(post_edit(server, source, lora="style0"))  # style1 evicted style0 (one kept)
    assert np.abs(again - style0).max() <= 1
    # the official trainer's checkpoint layout (PEFT folder; alpha from adapter_config.json): same strength as style0
    assert np.abs(pixels(post_edit(server, source, lora="official")) - style0).max() <= 1
    assert np.abs(pixels(post_edit(server, source, lora="style1", lora_scale="0")) - base).max() <= 1
    response = post_edit(server, source, seed="4")
    assert response.headers["X-Seed"] == "4" and np.abs(pixels(response) - base).max() > 10
    stages = dict(item.split(";dur=") for item in response.headers["Server-Timing"].split(", "))
    assert list(stages) == ["read", "decode", "hops", "wait", "model", "encode"]
    assert float(stages["model"]) == pytest.approx(1000 * float(response.headers["X-Edit-Seconds"]), abs=1)
    assert all(float(ms) >= 0 for ms in stages.values())



def test_the_result_comes_in_the_asked_format(server, tiny):
    """`output_format` on /v1/edit: the replica encodes JPEG or WebP itself at the quality `output_compression` asks,
    answered with its media type: the bytes are the PNG result's pixels in that codec, exactly."""
    from longcat_ray.serving.uploads import Encoding, encode_image

    source = png_bytes(reference_image(tiny))
    png = Image.fromarray(pixels(post_edit(server, source)).astype(np.uint8))
    for name, quality in (("jpeg", 95), ("webp", 95), ("jpeg", 10)):
        response = post_edit(server, source, output_format=name, output_compression=str(quality))
        assert response.status_code == 200 and response.headers["content-type"] == f"image/{name}", response.text
        image = Image.open(io.BytesIO(response.content))
        assert image.format == name.upper() and image.size == (64, 48)
        same = Image.open(io.BytesIO(encode_image(png, Encoding(name, quality))))
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(same.convert("RGB"))), (name, quality)


def test_an_adapter_replaced_under_its_id_is_served_in_its_new_version(server, tiny, tiny_loras):
    """A LoRA file overwritten in the adapter root (a retrained export under the same id) is loaded afresh on the next
    request, not served from the replica's adapter cache."""
    import os
    import shutil

    source = png_bytes(reference_image(tiny))
    style0, style1 = (pixels(post_edit(server, source, lora=lora)) for lora in ("style0", "style1"))
    swap = tiny_loras / "swap.safetensors"
    try:
        shutil.copyfile(tiny_loras / "style1.safetensors", swap)
        assert np.abs(pixels(post_edit(server, source, lora="swap")) - style1).max() <= 1
        shutil.copyfile(tiny_loras / "style0" / "pytorch_lora_weights.safetensors", f"{swap}.new")
        os.replace(f"{swap}.new", swap)  # as an export lands: written beside, renamed over
        assert np.abs(pixels(post_edit(server, source, lora="swap")) - style0).max() <= 1
    finally:
        swap.unlink(missing_ok=True)


def bad_requests(tiny) -> list[tuple[str, dict, int, str]]:
    """(what, request kwargs, status, field): every kind of bad input of the issue."""
    good = png_bytes(reference_image(tiny))
    truncated = png_bytes(Image.effect_noise((96, 96), 60).convert("RGB"))[:-3000]
    bomb = png_bytes(Image.new("1", (4000, 4000)))
    return [
        ("no token", {"headers": {}}, 401, ""),
        ("wrong token", {"headers": {"Authorization": "Bearer nope"}}, 401, ""),
        ("not an image", {"image": b"%PDF-1.4 definitely not a picture"}, 422, "image"),
        ("empty upload", {"image": b""}, 422, "image"),
        ("truncated image", {"image": truncated}, 422, "image"),
        ("decompression bomb", {"image": bomb}, 413, "image"),
        ("upload over the byte limit", {"image": b"\x89PNG" + b"\0" * 2_000_000}, 413, "image"),
        ("no prompt", {"prompt": ""}, 422, "prompt"),
        ("steps 0", {"num_inference_steps": "0"}, 422, "num_inference_steps"),
        ("steps over max", {"num_inference_steps": "9"}, 422, "num_inference_steps"),
        ("steps not a number", {"num_inference_steps": "many"}, 422, "num_inference_steps"),
        ("guidance negative", {"guidance_scale": "-1"}, 422, "guidance_scale"),
        ("guidance over max", {"guidance_scale": "50"}, 422, "guidance_scale"),
        ("guidance nan", {"guidance_scale": "nan"}, 422, "guidance_scale"),
        ("width off grid", {"width": "100"}, 422, "width"),
        ("width over max", {"width": "4096"}, 422, "width"),
        ("height under min", {"height": "8"}, 422, "height"),
        ("lora scale", {"lora_scale": "3"}, 422, "lora_scale"),
        ("gif output", {"output_format": "gif"}, 422, "output_format"),
        ("quality over 100", {"output_format": "jpeg", "output_compression": "101"}, 422, "output_compression"),
        ("unknown lora", {"lora": "nope"}, 404, "lora"),
        ("pickle file in the root", {"lora": "pickled"}, 404, "lora"),
        ("lora ..", {"lora": "../style0"}, 400, "lora"),
        ("lora absolute", {"lora": "/etc/passwd"}, 400, "lora"),
        ("lora s3 url", {"lora": "s3://bucket/x"}, 400, "lora"),
        ("lora http url", {"lora": "http://evil.example/x.safetensors"}, 400, "lora"),
        ("lora nested ..", {"lora": "style0/../../x"}, 400, "lora"),
        ("lora of another model", {"lora": "misfit"}, 422, "lora"),
        ("a LoKr file", {"lora": "lokr"}, 422, "lora"),
    ], good


def test_bad_input_gets_4xx_naming_the_field(server, tiny):
    cases, good = bad_requests(tiny)
    wrong = []
    for what, kwargs, status, field in cases:
        kwargs = dict(kwargs)
        response = post_edit(server, kwargs.pop("image", good), headers=kwargs.pop("headers", AUTH), **kwargs)
        named = field == "" or any(d["loc"][-1] == field for d in response.json()["detail"])
        if response.status_code != status or not named:
            wrong.append(f"{what}: {response.status_code} {response.text[:300]}")
    assert not wrong, "\n".join(wrong)
    misfit = post_edit(server, good, lora="misfit").json()["detail"][0]["msg"]
    assert "transformer_blocks.0.attn.to_q.lora_A.weight" in misfit and "999" in misfit
    assert pixels(post_edit(server, good)).shape == (48, 64, 3)  # still serving


def send_chunked_until_answered(url: str, path: str, total: int) -> tuple[int, bytes]:
    """POST a multipart upload of `total` zero bytes with `Transfer-Encoding: chunked` (no Content-Length), stopping
    as soon as the server answers or closes -> (bytes sent, the raw response)."""
    import select
    import time
    from urllib.parse import urlparse

    where = urlparse(url)
    sock = socket.create_connection((where.hostname, where.port))
    head = (f"POST {path} HTTP/1.1\r\nHost: {where.hostname}\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Transfer-Encoding: chunked\r\nContent-Type: multipart/form-data; boundary=b\r\n\r\n")
    part = b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\nContent-Type: image/png\r\n\r\n'
    sock.sendall(head.encode() + b"%x\r\n%s\r\n" % (len(part), part))
    chunk, sent = b"\0" * 65536, 0
    frame = b"%x\r\n%s\r\n" % (len(chunk), chunk)
    try:
        while sent < total:
            readable, writable, _ = select.select([sock], [sock], [], 30)
            if readable:
                break
            if writable:
                sock.sendall(frame)
                sent += len(chunk)
                time.sleep(0.001)  # at most ~64 MB/s: a fast client on a slow link, not loopback's GB/s
    except (BrokenPipeError, ConnectionResetError):
        pass  # closed after answering: the answer is still in our receive buffer
    sock.settimeout(30)
    response = b""
    try:
        while b"\r\n\r\n" not in response or len(response) < response.find(b"\r\n\r\n") + 20:
            data = sock.recv(65536)
            if not data:
                break
            response += data
    except (ConnectionResetError, TimeoutError):
        pass
    sock.close()
    return sent, response


@pytest.mark.parametrize("path,shape", [("/v1/edit", b'"detail"'), ("/v1/images/edits", b'"error"')])
def test_a_chunked_upload_over_the_limit_is_cut_off(server, path, shape):
    """No Content-Length to check up front: the body is counted as it arrives and refused at the limit (1 MB
    here), not read whole (200 MB offered, ~3 s at the client's pace), and the server keeps serving. (Serve's proxy
    queues whatever arrives until the request ends, so a faster client gets more in before the 413.)"""
    sent, response = send_chunked_until_answered(server, path, 200 * 2**20)
    assert response.startswith(b"HTTP/1.1 413"), response[:300]
    assert b"without a Content-Length" in response and shape in response, response[:600]
    assert sent < 100 * 2**20, f"{sent} bytes were taken before the 413"
    assert requests.get(f"{server}/healthz", timeout=30).json()["status"] == "ok"


@pytest.mark.parametrize("path,shape", [("/v1/edit", b'"detail"'), ("/v1/images/edits", b'"error"')])
def test_a_content_length_over_the_limit_is_refused_before_the_body(server, path, shape):
    """Only the headers are sent, announcing 50 MB (the limit is ~1 MB: the upload + room for the form): the 413
    comes without a byte of the body. Were the announced length not checked, the server would wait for the body
    (408 after upload_timeout_s)."""
    from urllib.parse import urlparse

    where = urlparse(server)
    with socket.create_connection((where.hostname, where.port), timeout=30) as sock:
        sock.sendall((f"POST {path} HTTP/1.1\r\nHost: {where.hostname}\r\nAuthorization: Bearer {TOKEN}\r\n"
                      "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 50000000\r\n\r\n").encode())
        response = b""
        while b"}" not in response and (data := sock.recv(65536)):
            response += data
    assert response.startswith(b"HTTP/1.1 413"), response[:300]
    assert b"request body of 50000000 bytes is over the limit of" in response and shape in response, response


def test_a_slow_loris_upload_is_cut_off_while_others_are_served(server, tiny):
    """A client trickling its body (a byte every 0.3 s, never finishing) is answered 408 once upload_timeout_s (5 s)
    has passed; meanwhile and after, other edits are served."""
    import threading
    import time
    from urllib.parse import urlparse

    where = urlparse(server)
    sock = socket.create_connection((where.hostname, where.port))
    head = (f"POST /v1/edit HTTP/1.1\r\nHost: {where.hostname}\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Transfer-Encoding: chunked\r\nContent-Type: multipart/form-data; boundary=b\r\n\r\n")
    part = b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\nContent-Type: image/png\r\n\r\n'
    sock.sendall(head.encode() + b"%x\r\n%s\r\n" % (len(part), part))  # then the file, a byte at a time
    answer, stop = [], threading.Event()

    def trickle():
        while not stop.is_set():
            try:
                sock.sendall(b"1\r\nx\r\n")
            except OSError:
                return
            time.sleep(0.3)

    def read():  # the whole answer: the server closes the connection after it
        sock.settimeout(60)
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except OSError as err:
            data += repr(err).encode()
        answer.append(data)

    started = time.monotonic()
    threads = [threading.Thread(target=trickle, daemon=True), threading.Thread(target=read, daemon=True)]
    for thread in threads:
        thread.start()
    source = png_bytes(reference_image(tiny, 2))
    assert post_edit(server, source, seed="3").status_code == 200  # while the slow upload holds its request
    threads[1].join(timeout=60)
    stop.set()
    took = time.monotonic() - started
    sock.close()
    assert answer and answer[0].startswith(b"HTTP/1.1 408"), answer
    assert b"upload_timeout_s" in answer[0] and 4.5 < took < 30, (took, answer[0][:400])
    assert post_edit(server, source, seed="4").status_code == 200


def test_a_burst_beyond_the_queue_gets_503_with_retry_after(server, tiny):
    """100 edits at once against max_queued_requests 8 (and the replica's 8 running): at least 8 are admitted (Serve's
    router counts an edit as queued until a replica takes it, so a burst may see 503 while the replica has room), the
    rest are refused at once with 503 and Retry-After, none fails otherwise, and the server serves the next request."""
    source = png_bytes(reference_image(tiny, 2))
    with ThreadPoolExecutor(100) as pool:
        responses = list(pool.map(lambda i: post_edit(server, source, seed=str(i)), range(100)))
    codes = sorted({r.status_code for r in responses})
    assert codes == [200, 503], codes
    busy = [r for r in responses if r.status_code == 503]
    assert all(r.headers["Retry-After"] == "10" and "max_queued_requests" in r.text for r in busy), busy[0].text
    assert 8 <= sum(r.status_code == 200 for r in responses) < 100
    assert post_edit(server, source, seed="1").status_code == 200


def test_concurrent_requests_are_batched(server, tiny):
    """As many edits at once as max_queued_requests (8): Serve's router counts each as queued until it is assigned to
    a replica, so only that many arriving together are sure to be admitted; all are served, in batches."""
    source = png_bytes(reference_image(tiny, 2))
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda i: post_edit(server, source, seed=str(i), lora="style1" if i % 2 else ""), range(8)))
    assert [r.status_code for r in responses] == [200] * 8, [r.text for r in responses if r.status_code != 200]
    assert all(pixels(r).shape == (48, 64, 3) for r in responses)
    assert max(int(r.headers["X-Batch-Size"]) for r in responses) > 1
    single = pixels(post_edit(server, source, seed="5", lora="style1"))  # a batched row equals the same request alone
    assert np.abs(pixels(responses[5]) - single).max() <= 1


def test_health_loras_and_docs(server, tiny):
    health = requests.get(f"{server}/healthz", timeout=30).json()
    assert health["status"] == "ok" and health["auth"] is True and health["device"] == "cpu"
    # the replica edited the size asked for at batches of 1 and 4 before it took a request
    warmup = health["warmup"]
    assert warmup["sizes"] == ["64x48"] and warmup["batch_sizes"] == [1, 4] and warmup["seconds"] > 0, warmup
    assert warmup["lora"] == "style0"
    assert requests.get(f"{server}/v1/loras", timeout=30).status_code == 401
    loras = requests.get(f"{server}/v1/loras", headers=AUTH, timeout=30).json()["loras"]
    assert [entry["id"] for entry in loras] == ["lokr", "misfit", "official", "style0", "style1"]
    facts = {entry["id"]: {k: entry.get(k) for k in ("rank", "alpha", "base_model")} for entry in loras}
    assert facts["style0"] == facts["style1"] == {"rank": 4, "alpha": 4, "base_model": str(tiny.model)}  # our export
    assert facts["official"] == {"rank": 4, "alpha": 8, "base_model": str(tiny.model)}  # its adapter_config.json
    assert [entry["id"] for entry in loras if "error" in entry] == ["lokr"]  # listed with the reason it cannot load
    schema = requests.get(f"{server}/openapi.json", timeout=30).json()
    assert {"image", "prompt", "lora", "seed"} <= set(
        schema["components"]["schemas"][schema["paths"]["/v1/edit"]["post"]["requestBody"]["content"]
                                        ["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[-1]]["properties"])
    assert requests.get(f"{server}/docs", timeout=30).status_code == 200


def test_page_in_headless_chromium(server, tiny, tmp_path):
    """The page as a user evaluating a LoRA drives it: a dropped source previews, the picker shows each adapter's
    rank and alpha, an edit lands in the history with its parameters and a download link, a comparison edits the
    same source and seed under the base model and a LoRA side by side, a bad field shows the server's message."""
    from playwright.sync_api import sync_playwright

    source = png_bytes(reference_image(tiny))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        page = browser.new_page()
        page.goto(f"{server}/")
        page.fill("#token", TOKEN)
        page.dispatch_event("#token", "change")  # stores the token and reloads the LoRA list with it
        page.wait_for_selector("#lora option[value=style0]", state="attached", timeout=30_000)
        assert page.inner_text("#lora option[value=style0]") == "style0  r4 α4"
        assert page.inner_text("#lora option[value=official]") == "official  r4 α8"
        assert page.eval_on_selector("#lora option[value=lokr]", "o => o.disabled")
        drop = page.evaluate_handle("""bytes => {
            const data = new DataTransfer();
            data.items.add(new File([Uint8Array.from(atob(bytes), c => c.charCodeAt(0))], "source.png", {type: "image/png"}));
            return data; }""", base64.b64encode(source).decode())
        page.dispatch_event("#drop", "drop", {"dataTransfer": drop})
        page.wait_for_function("document.getElementById('source').naturalWidth > 0", timeout=10_000)
        assert page.eval_on_selector("#image", "input => input.files.length") == 1
        page.fill("#prompt", "swap the red and blue colours")
        page.select_option("#lora", "style0")
        assert page.inner_text("#lora-facts").startswith("r4 α4 · base ")
        for field, value in (("#num_inference_steps", "2"), ("#width", "64"), ("#height", "48")):
            page.fill(field, value)
        page.click("#submit")
        page.wait_for_function("[...document.querySelectorAll('#history img')].some(i => i.naturalWidth > 0)", timeout=60_000)
        assert page.eval_on_selector("#history img", "img => [img.naturalWidth, img.naturalHeight]") == [64, 48]
        caption = page.inner_text("#history figcaption")
        assert "style0 ×1" in caption and "2 steps" in caption and "64×48" in caption, caption
        assert page.eval_on_selector("#history a", "a => a.download.endsWith('.png') && a.href.startsWith('blob:')")
        page.fill("#seed", "7")
        page.check(".compare[value=style1]")  # beside the base model, checked by default
        page.click("#compare")
        page.wait_for_function("""[...document.querySelectorAll('#comparison img')].filter(i => i.naturalWidth > 0)
                                  .length === 2""", timeout=60_000)
        names = page.eval_on_selector_all("#comparison figcaption b", "bs => bs.map(b => b.textContent)")
        assert names == ["base model", "style1 ×1"], names
        assert all("seed 7" in text for text in page.eval_on_selector_all("#comparison figcaption", "fs => fs.map(f => f.textContent)"))
        assert page.eval_on_selector_all("#history .card", "cards => cards.length") == 3
        shot = Image.open(io.BytesIO(page.screenshot(full_page=True)))
        assert np.asarray(shot.convert("L"), np.float32).std() > 5  # something is drawn, not a blank page
        assert page.inner_text("#error") == ""
        page.fill("#num_inference_steps", "500")
        page.eval_on_selector("#num_inference_steps", "el => el.removeAttribute('max')")  # let the server judge it
        page.click("#submit")
        page.wait_for_function("document.getElementById('error').textContent.length > 0", timeout=30_000)
        assert "num_inference_steps" in page.inner_text("#error")
        browser.close()


def test_an_edit_reports_its_steps(server, tiny):
    """GET /v1/progress/{request_id}: the replica reports each denoising step of the edit sent with that id."""
    import time

    source = png_bytes(reference_image(tiny))
    assert requests.get(f"{server}/v1/progress/not-sent", headers=AUTH, timeout=30).status_code == 404
    refused = post_edit(server, source, request_id="no spaces allowed")
    assert refused.status_code == 422 and refused.json()["detail"][0]["loc"][-1] == "request_id"
    assert pixels(post_edit(server, source, request_id="edit-1", num_inference_steps="8")).shape == (48, 64, 3)
    for _ in range(50):  # the last step's report is sent without waiting; it lands within moments
        report = requests.get(f"{server}/v1/progress/edit-1", headers=AUTH, timeout=30)
        if report.status_code == 200 and report.json()["step"] == 8:
            break
        time.sleep(0.2)
    assert report.json() == {"id": "edit-1", "step": 8, "total": 8}
    assert requests.get(f"{server}/v1/progress/edit-1", timeout=30).status_code == 401  # bearer auth applies


def openai_client(server: str, token: str = TOKEN):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key=token, max_retries=0, timeout=120)


def decoded(item) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item.b64_json))).convert("RGB"), np.float32)


def test_the_openai_client_edits_with_the_base_or_a_lora(server, tiny):
    """The official `openai` package against /v1/images/edits: the same pixels as /v1/edit for the same request,
    `n` images from consecutive seeds in one call, `model` picking the adapter, /v1/models listing them."""
    client, source = openai_client(server), png_bytes(reference_image(tiny))
    extras = {"seed": 3, "num_inference_steps": 2}
    ask = dict(image=("source.png", source, "image/png"), prompt="swap the red and blue colours", size="64x48",
               extra_body=extras)
    one = client.images.edit(**ask)
    assert one.size == "64x48" and one.output_format == "png" and [d.seed for d in one.data] == [3]
    assert np.abs(decoded(one.data[0]) - pixels(post_edit(server, source))).max() <= 1
    two = client.images.edit(**{**ask, "image": [("source.png", source, "image/png")]}, n=2, model="style0")  # as image[]
    assert [d.seed for d in two.data] == [3, 4]
    style0 = pixels(post_edit(server, source, lora="style0"))
    assert np.abs(decoded(two.data[0]) - style0).max() <= 1 and np.abs(decoded(two.data[1]) - style0).max() > 10
    jpeg = client.images.edit(**ask, output_format="jpeg", output_compression=95)
    assert Image.open(io.BytesIO(base64.b64decode(jpeg.data[0].b64_json))).format == "JPEG"
    assert [m.id for m in client.models.list()] == ["longcat-image-edit", "misfit", "official", "style0", "style1"]


def test_the_openai_client_raises_its_matching_error_naming_the_param(server, tiny):
    import openai

    client, source = openai_client(server), png_bytes(reference_image(tiny))
    image = ("source.png", source, "image/png")
    cases = [
        ("wrong token", openai_client(server, "nope"), {}, openai.AuthenticationError, None),
        ("unknown model", client, {"model": "nope"}, openai.NotFoundError, "model"),
        ("a path as model", client, {"model": "../style0"}, openai.BadRequestError, "model"),
        ("a LoRA of another model", client, {"model": "misfit"}, openai.UnprocessableEntityError, "model"),
        ("n over 4", client, {"n": 5}, openai.UnprocessableEntityError, "n"),
        ("size off the grid", client, {"size": "100x48"}, openai.UnprocessableEntityError, "width"),
        ("size not WxH", client, {"size": "big"}, openai.UnprocessableEntityError, "size"),
        ("url results", client, {"response_format": "url"}, openai.BadRequestError, "response_format"),
        ("a mask", client, {"mask": image}, openai.BadRequestError, "mask"),
        ("two images", client, {"image": [image, image]}, openai.BadRequestError, "image"),
        ("not an image", client, {"image": ("x.pdf", b"%PDF-1.4", "application/pdf")}, openai.UnprocessableEntityError, "image"),
        ("empty prompt", client, {"prompt": " "}, openai.UnprocessableEntityError, "prompt"),
        ("gif output", client, {"output_format": "gif"}, openai.BadRequestError, "output_format"),
        ("steps over max", client, {"extra_body": {"num_inference_steps": 9}}, openai.UnprocessableEntityError, "num_inference_steps"),
    ]
    wrong = []
    for what, who, kwargs, error, param in cases:
        try:
            who.images.edit(**{"image": image, "prompt": "swap the colours", "size": "64x48", **kwargs})
            wrong.append(f"{what}: no error")
        except openai.APIStatusError as err:
            body = err.body if isinstance(err.body, dict) else {}
            if type(err) is not error or body.get("param") != param or not body.get("message"):
                wrong.append(f"{what}: {type(err).__name__} {err.status_code} {body}")
    assert not wrong, "\n".join(wrong)


def test_a_replica_killed_mid_request_answers_503_and_is_replaced(server, tiny):
    """SIGKILL of the model replica while edits run on it: those edits get 503 with Retry-After and a sentence (not a
    500 with Ray's traceback), none any other error; Serve starts a new replica, which serves the next edit. (Last in
    this module: it replaces the module's replica.)"""
    import signal
    import time

    from tests.ray_cluster import processes_under

    victim = processes_under(os.getpid(), "ServeReplica:longcat-ray:EditModel")  # this session's Ray only
    assert len(victim) == 1, victim
    source = png_bytes(reference_image(tiny, 2))
    ids = [f"doomed-{i}" for i in range(8)]  # max_queued_requests at once: none refused by the queue

    def denoising() -> bool:
        return any(requests.get(f"{server}/v1/progress/{i}", headers=AUTH, timeout=30).status_code == 200 for i in ids)

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(post_edit, server, source, seed=str(n), num_inference_steps="8", request_id=i)
                   for n, i in enumerate(ids)]
        deadline = time.time() + 120
        while not denoising():  # a batch is on the replica, in its steps
            assert time.time() < deadline, "no edit started denoising within 120 s"
            time.sleep(0.02)
        victim[0].send_signal(signal.SIGKILL)
        responses = [f.result() for f in futures]
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503} and 503 in codes, codes
    died = [r for r in responses if r.status_code == 503]
    assert all(r.headers["Retry-After"] == "10" and "model replica running this edit stopped" in r.text for r in died), died[0].text
    deadline = time.time() + 180
    while time.time() < deadline:
        answer = post_edit(server, source, seed="9")
        if answer.status_code == 200:
            break
        time.sleep(2)
    assert answer.status_code == 200, answer.text
    replaced = processes_under(os.getpid(), "ServeReplica:longcat-ray:EditModel")
    assert replaced and replaced[0].pid != victim[0].pid
