"""The Ray Serve application: a FastAPI ingress and a model deployment running the one inference path.

    HTTP ──► Ingress (FastAPI: auth, limits, form checks; CPU)
                 │ handle.options(multiplexed_model_id=<lora id>)
                 ▼
             EditModel (1 GPU per replica, CPU without GPUs; autoscaled)
                 @serve.multiplexed: LoRAs loaded per replica, least recently used unloaded
                 BatchQueue: requests of one size/steps/CFG/LoRA share one denoising batch, formed
                 when the model is free (serving/batching.py)

Bad input is answered by the ingress with a 4xx naming the field and never reaches the model.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures at runtime.
import asyncio
import dataclasses
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources

from fastapi import Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from PIL import Image
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError

from longcat_ray.inference import (EditRequest, Editor, add_lora_weights, batch_key, edit_images, load_pipeline,
                                   read_checked_lora, speed_up)
from longcat_ray.lora_files import LoraWeights
from longcat_ray.buckets import resize_image
from longcat_ray.serving.adapters import find_lora, list_loras, local_copy
from longcat_ray.serving.batching import BatchQueue
from longcat_ray.serving.body_limit import BodyLimit
from longcat_ray.serving.compile_cache import cache_url, load_compiled, save_compiled
from longcat_ray.serving import openai_compat as oai
from longcat_ray.serving.config import ServeConfig
from longcat_ray.serving.uploads import (OUTPUT_FORMATS, Encoding, RequestError, build_request, check_range,
                                         check_request_id, decode_upload, encode_image, output_encoding)

APP_NAME = "longcat-ray"
ACTIVE_ADAPTER = "active"


@dataclass
class EditJob:
    """One request as the model replica receives it (already checked by the ingress)."""

    image: Image.Image
    """The source at the request's output size (resize_image, as encode_condition would)."""
    request: EditRequest
    lora: str | None = None
    lora_url: str | None = None
    lora_version: str = ""
    """The adapter file's version (adapters.file_version) when the request was checked."""
    lora_scale: float = 1.0
    request_id: str | None = None
    """The client's id for GET /v1/progress/{id}."""
    timing: dict[str, float] = dataclasses.field(default_factory=dict)
    """The ingress's milliseconds so far (reading the upload; decoding, checking and resizing it)."""
    encoding: Encoding = Encoding()
    """The result's format, encoded once by the replica (off its event loop) and passed through as it is."""

    @property
    def adapter_key(self) -> str:
        """Which adapter file, in which version: the replicas' adapter cache and routing key ("" for the base)."""
        return f"{self.lora_url}#{self.lora_version}" if self.lora_url else ""

    def group(self) -> tuple:
        return (self.adapter_key, self.lora_scale, *batch_key(self.request))


@dataclass
class EditResult:
    image: bytes
    """The result, encoded as its job asked (EditJob.encoding)."""
    batch_size: int
    started: float
    """When its batch went to the model (the replica's perf_counter): the request's wait ends there."""
    timing: dict[str, float]
    """Milliseconds per stage of this request's way through the server (the `Server-Timing` header); "model" is
    the model time of the batch it was in (conditioning, denoising, decoding)."""

    @property
    def seconds(self) -> float:
        return self.timing["model"] / 1000

    def server_timing(self) -> str:
        """`Server-Timing` (W3C): browsers' network panels and clients show where the server's time went."""
        return ", ".join(f"{name};dur={ms:.1f}" for name, ms in self.timing.items())


@dataclass(eq=False)
class LoadedAdapter:
    """What @serve.multiplexed caches per adapter (least recently used dropped first): its checked weights, on the
    model's device. The DiT carries one of them at a time as its one peft adapter (EditModel.use_adapter)."""

    key: str
    weights: LoraWeights


class ProgressBoard:
    """Steps done per client request id, pushed by the model replicas after each denoising step and read by the
    ingress (one replica, no CPU: a dict). Entries older than PROGRESS_TTL_S are dropped, in a sweep at most once a
    minute (not on every step's update)."""

    def __init__(self):
        self.items: dict[str, tuple[int, int, float]] = {}
        self.swept = time.monotonic()

    def update(self, ids: list[str], step: int, total: int) -> None:
        now = time.monotonic()
        if now - self.swept > 60:
            self.items, self.swept = {k: v for k, v in self.items.items() if now - v[2] < PROGRESS_TTL_S}, now
        self.items.update({i: (step, total, now) for i in ids})

    def get(self, request_id: str) -> dict | None:
        item = self.items.get(request_id)
        return None if item is None else {"id": request_id, "step": item[0], "total": item[1]}


PROGRESS_TTL_S = 600


class EditModel:
    """The pipeline on one device; every model call runs on one worker thread, in order."""

    def __init__(self, config: ServeConfig, progress=None):
        import torch

        self.config, self.progress = config, progress
        device = "cuda" if config.gpus() > 0 and torch.cuda.is_available() else "cpu"
        self.editor = Editor(load_pipeline(config.model, device=device))
        cache = cache_url(config, torch.cuda.get_device_name() if device == "cuda" else "cpu") if config.compile else None
        loaded = load_compiled(cache, config.lora_storage_options)
        speed_up(self.editor.pipe, config.quantize, config.compile)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="longcat-model")
        self.fatal: str | None = None
        self.active: LoadedAdapter | None = None  # whose weights the DiT's one adapter holds

        async def load(key: str) -> LoadedAdapter:  # a plain function: Serve keeps its LRU cache on it
            return await self._load(key)

        self.get_adapter = serve.multiplexed(max_num_models_per_replica=config.max_loras_per_replica)(load)
        self.queue = BatchQueue(self.run_group, key=EditJob.group, max_batch_size=config.max_batch_size,
                                wait_s=config.batch_wait_timeout_s)
        self.warmup = self.warm_up()  # before __init__ returns: Serve routes nothing here yet
        self.warmup["compile_cache"] = compile_cache_state(cache, loaded, config.lora_storage_options)

    def warm_up(self) -> dict:
        """warm_up; with `warmup_lora`, once with that adapter active and once with it off (the base behind LoRA
        layers: a graph of its own once any adapter has been loaded)."""
        if not self.config.warmup_lora:
            return warm_up(self.editor.pipe, self.config)
        url, version = find_lora(self.config.lora_root, self.config.warmup_lora, self.config.lora_storage_options)
        self.use_adapter(LoadedAdapter(f"{url}#{version}", self.read_adapter(url)), 1.0)
        with_lora = warm_up(self.editor.pipe, self.config)
        self.use_adapter(None, 1.0)
        base = warm_up(self.editor.pipe, self.config)
        return {**base, "lora": self.config.warmup_lora, "seconds": round(with_lora["seconds"] + base["seconds"], 2)}

    def submit(self, fn, *args):
        return self.executor.submit(fn, *args)

    async def _load(self, key: str) -> LoadedAdapter:
        """`key`: EditJob.adapter_key (the URL and the file's version: a replaced file loads as a new adapter, and
        the old one leaves the cache as the least recently used)."""
        weights = await asyncio.wrap_future(self.submit(self.read_adapter, key.rsplit("#", 1)[0]))
        return LoadedAdapter(key, weights)

    def read_adapter(self, url: str) -> LoraWeights:
        """The adapter file, checked against the DiT, its tensors on the DiT's device in its dtype."""
        transformer = self.editor.pipe.transformer
        weights = read_checked_lora(transformer, local_copy(url, self.config.lora_storage_options))
        state = {k: v.to(transformer.device, transformer.dtype) for k, v in weights.state.items()}
        return dataclasses.replace(weights, state=state)

    def use_adapter(self, adapter: LoadedAdapter | None, scale: float) -> None:
        """Make `adapter` (None: the base) the DiT's active adapter at `scale`, on the model's thread.

        Every adapter goes in under one peft name (ACTIVE_ADAPTER): a compiled DiT guards on adapter names, so a
        name per adapter compiled both block graphs again for each new adapter (16 s on an H200, and past the
        recompile limit the blocks would run uncompiled). Under one name, an adapter of the same ranks and targets
        as the one before replaces it without compiling (held scales: no strength does either)."""
        if adapter is None:
            self.editor.use_loras({})
            return
        if self.active is not adapter:
            self.drop_active()
            try:
                add_lora_weights(self.editor.pipe.transformer, adapter.weights, ACTIVE_ADAPTER)
            except Exception:
                self.drop_active()  # half made: the next one starts clean
                raise
            self.editor.loras[ACTIVE_ADAPTER], self.active = adapter.key, adapter
        self.editor.use_loras({ACTIVE_ADAPTER: scale})

    def drop_active(self) -> None:
        """The DiT's adapter, whole or half made, deleted."""
        transformer, self.active = self.editor.pipe.transformer, None
        self.editor.loras.pop(ACTIVE_ADAPTER, None)
        if ACTIVE_ADAPTER in getattr(transformer, "peft_config", {}):
            transformer.delete_adapters(ACTIVE_ADAPTER)

    async def edit(self, job: EditJob) -> EditResult:
        arrived = time.perf_counter()
        result = await self.queue.submit(job)
        result.timing = {"wait": 1000 * (result.started - arrived), **result.timing}  # the adapter's load included
        return result

    async def run_group(self, jobs: list[EditJob]) -> list[EditResult]:
        """Jobs of one (LoRA, size, steps, CFG) group -> one denoising batch."""
        try:
            adapter = await self.get_adapter(jobs[0].adapter_key) if jobs[0].adapter_key else None
            start = time.perf_counter()
            images = await asyncio.wrap_future(self.submit(self.edit_group, adapter, jobs))
        except Exception as err:
            self.note_fatal(err)
            raise
        seconds = time.perf_counter() - start
        encoded = await asyncio.gather(*(asyncio.to_thread(encode_image, image, job.encoding)  # off the event loop
                                         for image, job in zip(images, jobs)))
        timing = {"model": 1000 * seconds, "encode": 1000 * (time.perf_counter() - start - seconds)}
        return [EditResult(data, len(jobs), start, dict(timing)) for data in encoded]

    def edit_group(self, adapter: LoadedAdapter | None, jobs: list[EditJob]) -> list[Image.Image]:
        self.use_adapter(adapter, jobs[0].lora_scale)
        ids = [j.request_id for j in jobs if j.request_id]
        report = None  # fire and forget: a step never waits for the board
        if ids and self.progress is not None:
            report = lambda step, total: self.progress.update.remote(ids, step, total)  # noqa: E731
        return edit_images(self.editor.pipe, [j.image for j in jobs], [j.request for j in jobs], report)

    def note_fatal(self, err: Exception) -> None:
        """A CUDA error poisons the process: report unhealthy so Serve replaces the replica."""
        if "CUDA error" in str(err) or "cudaError" in str(err):
            self.fatal = f"{type(err).__name__}: {err}"

    def check_health(self) -> None:
        if self.fatal:
            raise RuntimeError(f"model replica is broken by an earlier error: {self.fatal}")

    def info(self) -> dict:
        pipe = self.editor.pipe
        return {"model": self.config.model, "device": str(pipe.device), "dtype": str(pipe.transformer.dtype),
                "active_lora": self.active.key if self.active else None, "warmup": self.warmup}


def compile_cache_state(url: str | None, loaded: bool, options: dict) -> str:
    """After the warm-up: save what compiled unless it came from the cache -> what /healthz says of the cache."""
    if url is None:
        return "off"
    if loaded:
        return "loaded"
    return "saved" if save_compiled(url, options) else "empty"


WARMUP_STEPS = 2  # compiles happen in the first step; a second one shows the steady path runs


def warm_up(pipe, config: ServeConfig) -> dict:
    """One edit per warm-up size at a batch of one and of `max_batch_size` (a grey source, the default guidance):
    what compiles, compiles here (by default only when something compiles). -> what was warmed and how long."""
    start = time.perf_counter()
    compiling = config.compile and pipe.device.type == "cuda"
    shapes, batches = config.warmup_shapes(compiling), sorted({1, config.max_batch_size})
    for width, height in shapes:
        source = Image.new("RGB", (width, height), (128, 128, 128))
        for batch in batches:
            request = EditRequest(prompt="warm-up", width=width, height=height, steps=WARMUP_STEPS,
                                  guidance=config.default_guidance)
            edit_images(pipe, [source] * batch, [request] * batch)
    return {"sizes": [f"{w}x{h}" for w, h in shapes], "batch_sizes": batches, "seconds": round(time.perf_counter() - start, 2)}


api = FastAPI(
    title="longcat-ray",
    description="Instruction image editing with LongCat-Image-Edit and per-request LoRA adapters.",
    version="1",
)
bearer = HTTPBearer(auto_error=False)


def error_body(path: str, err: RequestError) -> dict:
    """A bad request in the route's own shape: OpenAI's error object on its routes, FastAPI's `detail` elsewhere."""
    if oai.is_openai_path(path):
        return oai.error_body(err.status, err.message, err.field)
    return {"detail": [{"loc": ["body", err.field], "msg": err.message, "type": "request_error"}]}


def error_response(request: Request, err: RequestError) -> JSONResponse:
    return JSONResponse(error_body(request.url.path, err), status_code=err.status)


def body_refused(scope: dict, status: int, message: str) -> tuple[int, dict]:
    """BodyLimit's refusals (413 over the size, 408 too slow), shaped as the route's other errors."""
    err = RequestError(status, "image", message)
    return err.status, error_body(scope.get("path", ""), err)


@api.exception_handler(RequestError)
async def request_error(request: Request, err: RequestError) -> JSONResponse:
    return error_response(request, err)


@api.exception_handler(StarletteHTTPException)  # also FastAPI's, and the router's 404/405
async def http_error(request: Request, err: StarletteHTTPException) -> Response:
    if not oai.is_openai_path(request.url.path):
        return await http_exception_handler(request, err)
    return JSONResponse(oai.error_body(err.status_code, str(err.detail)), status_code=err.status_code, headers=err.headers)


@api.exception_handler(RequestValidationError)
async def validation_error(request: Request, err: RequestValidationError) -> Response:
    """A missing or mistyped form field (FastAPI's own check)."""
    if not oai.is_openai_path(request.url.path):
        return await request_validation_exception_handler(request, err)
    first = err.errors()[0]
    return error_response(request, RequestError(422, str(first["loc"][-1]), first["msg"]))


api.add_middleware(BodyLimit, limit=lambda: getattr(api.state, "max_body", None),
                   timeout=lambda: getattr(api.state, "upload_timeout_s", None), error=body_refused)


@serve.ingress(api)
class Ingress:
    def __init__(self, model, config: ServeConfig, progress=None):
        self.model, self.config, self.token, self.progress = model, config, config.token(), progress
        # Multipart framing adds a little to the image itself.
        api.state.max_body = config.max_upload_bytes + 64 * 1024
        api.state.upload_timeout_s = config.upload_timeout_s

    def authorize(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        if self.token is None:
            return
        if credentials is None or not secrets.compare_digest(credentials.credentials.encode(), self.token.encode()):
            raise HTTPException(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                                headers={"WWW-Authenticate": "Bearer"})

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page(self) -> str:
        return resources.files("longcat_ray.serving").joinpath("page.html").read_text()

    @api.get("/healthz")
    async def healthz(self) -> dict:
        """The ingress is up and a model replica answers."""
        try:
            info = await asyncio.wait_for(self.model.info.remote(), timeout=10)
        except Exception as err:  # noqa: BLE001 - any failure means not ready
            raise HTTPException(503, f"model not ready: {type(err).__name__}: {err}") from None
        return {"status": "ok", "auth": self.token is not None, **info}

    @api.get("/v1/loras")
    def loras(self, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict:
        """Adapter ids under the adapter root (pass one as `lora` to /v1/edit)."""
        self.authorize(credentials)
        return {"loras": list_loras(self.config.lora_root, self.config.lora_storage_options)}

    @api.post("/v1/edit", response_class=Response,
              responses={200: {"content": {media: {} for _, media in OUTPUT_FORMATS.values()}}})
    async def edit(
        self,
        image: UploadFile = File(..., description="the source image (PNG, JPEG, WebP, ...)"),
        prompt: str = Form(..., description="the edit instruction"),
        negative_prompt: str = Form("", description="what to steer away from (with guidance_scale > 1)"),
        guidance_scale: float | None = Form(None, description="CFG scale; <= 1 turns CFG off (default 4.5)"),
        num_inference_steps: int | None = Form(None, description="denoising steps (default 40)"),
        width: int | None = Form(None, description="output width, 16-px grid (default: from the source's aspect)"),
        height: int | None = Form(None, description="output height, 16-px grid"),
        seed: int | None = Form(None, description="noise seed (default: random; returned in X-Seed)"),
        lora: str | None = Form(None, description="adapter id from GET /v1/loras (default: the base model)"),
        lora_scale: float = Form(1.0, description="adapter strength, 0..2"),
        request_id: str | None = Form(None, description="your id for this edit: GET /v1/progress/{id} reports its steps"),
        output_format: str | None = Form(None, description="png (default), jpeg or webp"),
        output_compression: int | None = Form(None, description="JPEG/WebP quality 0-100 (default 90)"),
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
    ) -> Response:
        """Edit `image` by `prompt`; returns the image, PNG unless `output_format` says otherwise (headers: X-Seed,
        X-Lora, X-Batch-Size, X-Edit-Seconds, and Server-Timing: milliseconds to read, decode and resize the upload, to
        reach the model replica and back, waiting there for the model, in the model, and encoding the result)."""
        self.authorize(credentials)
        encoding = output_encoding(output_format, output_compression)
        seed = secrets.randbelow(2**31) if seed is None else seed
        job = await self.make_job(image, lora or None, lora_scale, encoding, prompt=prompt,
                                  negative_prompt=negative_prompt, guidance_scale=guidance_scale,
                                  num_inference_steps=num_inference_steps, width=width, height=height, seed=seed)
        job.request_id = check_request_id(request_id) if request_id else None
        result = await self.run(job)
        headers = {"X-Seed": str(seed), "X-Lora": lora or "", "X-Batch-Size": str(result.batch_size),
                   "X-Edit-Seconds": f"{result.seconds:.3f}", "Server-Timing": result.server_timing()}
        return Response(result.image, media_type=OUTPUT_FORMATS[encoding.format][1], headers=headers)

    async def make_job(self, image: UploadFile, lora: str | None, lora_scale: float, encoding: Encoding,
                       **fields) -> EditJob:
        """An upload and form fields -> the checked job (RequestError naming the first bad field)."""
        check_range("lora_scale", lora_scale, 0, 2)
        lora_url, version = find_lora(self.config.lora_root, lora, self.config.lora_storage_options) if lora else (None, "")
        start = time.perf_counter()
        data = await image.read(self.config.max_upload_bytes + 1)
        read = time.perf_counter()
        source, request = await asyncio.to_thread(self.checked_source, data, fields)  # off the event loop
        return EditJob(image=source, request=request, lora=lora, lora_url=lora_url, lora_version=version,
                       lora_scale=lora_scale, encoding=encoding, timing={"read": 1000 * (read - start),
                                                      "decode": 1000 * (time.perf_counter() - read)})

    def checked_source(self, data: bytes, fields: dict) -> tuple[Image.Image, EditRequest]:
        """The upload decoded and checked, the request built, and the source resized to the output size: the model's
        first step (encode_condition) done here, off the model's thread, so the replica receives the output size's
        pixels instead of the upload's (a 12 MP photo is 36 MB as an object, 1.7 MB at 768²)."""
        source = decode_upload(data, self.config)
        request = build_request(source, self.config, **fields)
        return resize_image(source, request.width, request.height), request

    @api.get("/v1/progress/{request_id}")
    async def progress_of(self, request_id: str, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict:
        """Denoising steps done for the edit sent with this `request_id` (404 until its first step, and after
        ten minutes)."""
        self.authorize(credentials)
        found = await self.progress.get.remote(check_request_id(request_id)) if self.progress else None
        if found is None:
            raise HTTPException(404, f"no steps reported for request_id {request_id!r} (not started, or unknown)")
        return found

    @api.get("/v1/models")
    def models(self, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict:
        """OpenAI's model list: `longcat-image-edit` (the base) and every adapter id (use one as `model`)."""
        self.authorize(credentials)
        return oai.model_list(list_loras(self.config.lora_root, self.config.lora_storage_options))

    @api.post("/v1/images/edits")
    async def images_edits(
        self,
        prompt: str = Form(..., description="the edit instruction"),
        image: list[UploadFile] | None = File(None, description="the source image (one)"),
        image_list: list[UploadFile] | None = File(None, alias="image[]", description="the source image, as `image[]`"),
        mask: UploadFile | None = File(None, description="not supported (400)"),
        model: str | None = Form(None, description=f"an adapter id from GET /v1/models, or {oai.BASE_MODEL!r}"),
        n: int = Form(1, description=f"images to make, 1-{oai.MAX_N}, with seeds seed, seed+1, ..."),
        size: str | None = Form(None, description="WIDTHxHEIGHT on the 16-px grid, or auto (the source's aspect)"),
        response_format: str | None = Form(None, description="b64_json (url: 400, no result store)"),
        output_format: str | None = Form(None, description="png (default), jpeg or webp"),
        output_compression: int | None = Form(None, description="JPEG/WebP quality 0-100"),
        background: str | None = Form(None, description="auto or opaque (transparent: 400)"),
        stream: bool | None = Form(None, description="not supported (400)"),
        negative_prompt: str = Form("", description="extra: what to steer away from"),
        seed: int | None = Form(None, description="extra: the first image's seed"),
        num_inference_steps: int | None = Form(None, description="extra: denoising steps"),
        guidance_scale: float | None = Form(None, description="extra: CFG scale"),
        lora_scale: float = Form(1.0, description="extra: adapter strength, 0..2"),
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
    ) -> dict:
        """OpenAI's image edit (the `openai` client's `images.edit`): JSON with `data[].b64_json`, errors as
        `{"error": {...}}`."""
        self.authorize(credentials)
        uploads = [*(image or []), *(image_list or [])]
        oai.check_supported(images=len(uploads), n=n, response_format=response_format, mask=mask is not None,
                            stream=stream, background=background)
        encoding = output_encoding(output_format, output_compression, status=400)
        width, height = oai.parse_size(size)
        used = oai.seeds(seed, n)
        job = await self.make_job(uploads[0], oai.adapter_of(model), lora_scale, encoding, prompt=prompt,
                                  negative_prompt=negative_prompt, guidance_scale=guidance_scale,
                                  num_inference_steps=num_inference_steps, width=width, height=height, seed=used[0])
        jobs = [dataclasses.replace(job, request=dataclasses.replace(job.request, seed=s)) for s in used]
        results = await asyncio.gather(*(self.run(j) for j in jobs))  # one denoising batch when they fit
        images = [r.image for r in results]
        return oai.images_response(images, used, job.request.width, job.request.height, encoding.format)

    async def run(self, job: EditJob) -> EditResult:
        from longcat_ray.inference import LoraError

        try:
            start = time.perf_counter()
            result = await self.model.options(multiplexed_model_id=job.adapter_key).edit.remote(job)
            called = 1000 * (time.perf_counter() - start)
            hops = called - sum(result.timing.values())  # to the replica and back, not counting its own stages
            result.timing = {**job.timing, "hops": hops, **result.timing}
            return result
        except LoraError as err:
            raise RequestError(422, "lora", str(err)) from None
        except BackPressureError:
            raise HTTPException(503, f"every model replica is busy and {self.config.max_queued_requests} edits are "
                                f"waiting (max_queued_requests); retry later",
                                headers={"Retry-After": str(self.config.retry_after_s)}) from None
        except (RayActorError, ActorUnavailableError):
            # the replica process died or was cut off with this edit on it; Serve starts a new one
            raise HTTPException(503, "the model replica running this edit stopped before it finished (Serve is "
                                "replacing it); retry later", headers={"Retry-After": str(self.config.retry_after_s)}) from None


def build_app(config: ServeConfig):
    """The Serve application (what `serve run`/`serve deploy` and `longcat-ray serve` start)."""
    model = serve.deployment(
        EditModel,
        name="EditModel",
        ray_actor_options={"num_gpus": config.gpus(), "num_cpus": 1},
        max_ongoing_requests=max(2 * config.max_batch_size, 8),
        max_queued_requests=config.max_queued_requests,
        autoscaling_config={"min_replicas": config.min_replicas, "max_replicas": config.max_replicas,
                            "target_ongoing_requests": config.target_ongoing_requests},
        health_check_period_s=10,
        health_check_timeout_s=60,
    )
    ingress = serve.deployment(Ingress, name="Ingress", ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
    progress = serve.deployment(ProgressBoard, name="Progress", ray_actor_options={"num_cpus": 0},
                                max_ongoing_requests=1000).bind()
    return ingress.bind(model.bind(config, progress), config, progress)


def app(args: ServeConfig):
    """Application builder for `serve run` / `serve deploy` (import_path `longcat_ray.serving.app:app`): Serve
    validates the config file's `args` against ServeConfig and reports every bad key before deploying."""
    return build_app(args)


def run_local(config: ServeConfig, host: str, port: int, address: str | None = None) -> str:
    """Start Serve's proxy on host:port and deploy the app (on `address`'s cluster: `runtime.init_ray`)."""
    from longcat_ray.runtime import init_ray

    init_ray(address)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(config), name=APP_NAME, route_prefix="/", blocking=False)
    return f"http://{host}:{port}"
