"""``frankenllama serve``: llama-cpp-python's OpenAI-compatible server, running frankenllama.Llama.

This is ``python -m llama_cpp.server`` -- its FastAPI routes, settings and command line -- with
these changes:

- every model is a :class:`frankenllama.Llama` with the ``layer_order`` setting
  (``--layer_order``, or ``layer_order:`` per model in a ``--config_file``);
- several aliases can stay loaded at once (:class:`LlamaProxy`): every alias on the model file in
  use keeps its own model, order, KV cache and prompt cache, while the weights are memory-mapped
  from the one file (the page cache holds them once).  A request for an alias of another file
  closes those models and loads it, as llama_cpp.server does.  An unknown ``model`` is HTTP 404
  (llama_cpp.server silently answers with the default model instead);
- ``GET``/``PUT /v1/models/{alias}/layer_order`` read and change an alias's order while the server
  runs, and ``/v1/models`` lists each alias's order.  A ``PUT`` takes the two locks every
  llama_cpp.server request holds, so it lands between requests, never in the middle of one;
- every call into a model runs on one thread (:class:`_ModelThread`), which keeps llama.cpp's
  OpenMP worker threads from multiplying.

Run it with ``frankenllama serve --model M.gguf --layer_order 0-20,12-29`` or
``python -m frankenllama.server --config_file modes.yaml``; needs ``pip install "frankenllama[server]"``.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar, Union

import llama_cpp

from ..gguf_info import check_header
from ..gguf_tools import file_layer_order
from ..llama import Llama
from ..order import LayerOrderError, format_spec, parse_spec
from ..recipes import from_exl3_spec, resolve

try:
    import anyio
    import llama_cpp.server.app as upstream
    import llama_cpp.server.model as upstream_model
    import llama_cpp.server.settings as upstream_settings
    import uvicorn
    from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, status
    from fastapi.middleware import Middleware
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import JSONResponse
    from fastapi.routing import APIRoute
    from llama_cpp.server.cli import add_args_from_model, parse_model_from_args
    from pydantic import BaseModel, Field
    from starlette_context.middleware import RawContextMiddleware
    from starlette_context.plugins import RequestIdPlugin
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"frankenllama serve needs the server dependencies ({err.name or err} is missing): "
        'run `pip install "frankenllama[server]"`') from err

__all__ = ["ModelSettings", "ServerSettings", "Settings", "ConfigFileSettings", "LlamaProxy", "RequestError",
           "create_app", "load_config_file", "main"]

LAYER_ORDER_HELP = (
    "frankenllama: the decoder blocks to run, in order: a spec like '0-15,8-23,16-31' (inclusive "
    "ranges), exllamav3 ranges '0..15,8..23', or the path of a mergekit passthrough .yaml or Llama "
    "Blocks .txt recipe. Unset: the file's own order. Give orders here, not as kv_overrides "
    "(llama_cpp.server splits those on '=' and ':').")

T = TypeVar("T")
ServerSettings = upstream_settings.ServerSettings


class ModelSettings(upstream_settings.ModelSettings):
    """llama_cpp.server's model settings plus the layer order."""

    layer_order: Optional[str] = Field(default=None, description=LAYER_ORDER_HELP)


class Settings(ServerSettings, ModelSettings):
    """Server and model settings of a single-model server (the command-line options)."""


class ConfigFileSettings(ServerSettings):
    """The ``--config_file`` format: server settings and a ``models:`` list (with ``layer_order``)."""

    models: List[ModelSettings] = Field(default=[], description="Model configs")


def load_config_file(path: str | os.PathLike[str]) -> Tuple[ServerSettings, List[ModelSettings]]:
    """Read a llama_cpp.server config file (JSON, or YAML by its suffix).

    Raises:
        ValueError: the file is missing or invalid (pydantic's ValidationError is a ValueError).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        config = ConfigFileSettings.model_validate(yaml.safe_load(text) or {})
    else:
        config = ConfigFileSettings.model_validate_json(text)
    if not config.models:
        raise ValueError(f"config file {path} lists no models: add a `models:` list")
    return ServerSettings.model_validate(config.model_dump(exclude={"models"})), config.models


# --------------------------------------------------------------------------- models


def _log(message: str) -> None:
    print(f"frankenllama serve: {message}", file=sys.stderr, flush=True)


class RequestError(HTTPException):
    """A refused request, answered in OpenAI's error format (``{"error": {"message", "type",
    "param", "code"}}``) so that OpenAI clients expose the reason (``err.body["message"]``)."""

    def __init__(self, status_code: int, message: str, *, code: str, param: Optional[str] = None) -> None:
        super().__init__(status_code, message)
        self.code, self.param = code, param


async def _error_response(request: Request, exc: RequestError) -> JSONResponse:
    error = {"message": exc.detail, "type": "invalid_request_error", "param": exc.param, "code": exc.code}
    return JSONResponse({"error": error}, status_code=exc.status_code)


class _LlamaCppWithOrder:
    """What ``llama_cpp.server.model`` sees as its ``llama_cpp`` module while it loads one model:
    llama_cpp itself, except that ``Llama`` is a frankenllama.Llama with that model's order."""

    def __init__(self, layer_order: Optional[str]) -> None:
        class OrderedLlama(Llama):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, layer_order=layer_order, **kwargs)

        self.Llama = OrderedLlama

    def __getattr__(self, name: str) -> Any:
        return getattr(llama_cpp, name)


_LOAD_LOCK = threading.Lock()  # one swap of llama_cpp.server.model's llama_cpp at a time


def _weights(settings: ModelSettings) -> Tuple[Optional[str], str]:
    """Which weights an alias runs: aliases with the same key share one memory-mapped file."""
    if settings.hf_model_repo_id is not None:
        return settings.hf_model_repo_id, settings.model
    return None, os.path.realpath(settings.model)


def _planned_order(settings: ModelSettings) -> str:
    """The canonical order an alias will run once loaded, from the file's header alone.

    Raises:
        ValueError: the configured order is invalid for the file, or the file can't be read.
    """
    if settings.hf_model_repo_id is not None:  # not downloaded yet: nothing to check against
        return settings.layer_order or "(the file's own order)"
    if settings.layer_order is None:
        return format_spec(file_layer_order(settings.model))
    return format_spec(resolve(settings.layer_order, check_header(settings.model).n_layer))


class LlamaProxy(upstream_model.LlamaProxy):
    """llama_cpp.server's model proxy, holding several frankenllama models at once.

    - ``proxy(alias)`` returns the alias's model.  Every alias on the model file in use stays
      loaded; an alias of another file closes those and is loaded (llama_cpp.server keeps one
      model only).  The default alias's file is loaded at start, all its aliases with it.
    - An unknown alias raises HTTP 404 (``None`` is the default alias).
    - A model that cannot be loaded (an invalid order, a missing file, ...) raises HTTP 400 with
      the reason; the next request for it tries again.  The default alias must load: its error
      is raised as is from the constructor, and the server does not start.

    Calls must hold llama_cpp.server's request locks (``llama_cpp.server.app.get_llama_proxy``).
    """

    #: llama_cpp.server asks for this alias on /v1/engines/copilot-codex/completions
    COPILOT_ALIAS = "copilot-codex"

    def __init__(self, models: List[ModelSettings]) -> None:
        self._loaded: Dict[str, Llama] = {}
        try:
            super().__init__(models)  # loads the default alias with load_llama_from_model_settings
        except ValueError as err:
            raise ValueError(f"model {models[0].model_alias or models[0].model!r}: {err}") from None
        default = self._default_model_alias
        self._loaded[default] = self._current_model  # type: ignore[assignment]
        self._orders: Dict[str, str] = {default: format_spec(self._current_model.layer_order)}
        for alias, settings in self._model_settings_dict.items():
            if alias not in self._loaded and _weights(settings) == _weights(self._default_model_settings):
                try:
                    self._load(alias)
                except RequestError as err:
                    _log(f"{err.detail}; requests for it answer 400 until a PUT gives it an order it can run")
                    continue
            try:
                spec = self.layer_order(alias)
            except RequestError as err:
                _log(f"{err.detail}; requests for it will answer 400")
                continue
            _log(f"model {alias!r}: layer order {spec}" + ("" if alias in self._loaded else " (loaded on request)"))

    def alias(self, model: Optional[str]) -> str:
        """The alias a request's ``model`` names (``None``: the default one); HTTP 404 if none."""
        if model is None or (model == self.COPILOT_ALIAS and model not in self._model_settings_dict):
            return self._default_model_alias
        if model not in self._model_settings_dict:
            known = ", ".join(repr(a) for a in self)
            raise RequestError(status.HTTP_404_NOT_FOUND, f"model {model!r} not found: this server serves "
                               f"{known} (GET /v1/models)", code="model_not_found", param="model")
        return model

    def is_loaded(self, alias: str) -> bool:
        return alias in self._loaded

    def __call__(self, model: Optional[str] = None) -> Llama:
        alias = self.alias(model)
        llm = self._loaded.get(alias) or self._load(alias)
        self._current_model, self._current_model_alias = llm, alias
        return llm

    def _load(self, alias: str) -> Llama:
        settings = self._model_settings_dict[alias]
        others = [a for a in self._loaded if _weights(self._model_settings_dict[a]) != _weights(settings)]
        if others:
            self.layer_order(alias)  # an invalid order: 400 before closing anything
        for other in others:  # another file: one file's models at a time, as llama_cpp.server
            self._loaded.pop(other).close()
        try:
            llm = self.load_llama_from_model_settings(settings)
        except ValueError as err:
            raise RequestError(status.HTTP_400_BAD_REQUEST, f"model {alias!r} could not be loaded: {err}",
                               code="model_not_loaded", param="model") from None
        self._loaded[alias] = llm
        self._orders[alias] = format_spec(llm.layer_order)
        return llm

    @staticmethod
    def load_llama_from_model_settings(settings: ModelSettings) -> Llama:  # type: ignore[override]
        """llama_cpp.server's loader (every setting keeps working), building a frankenllama.Llama
        with ``settings.layer_order``."""
        with _LOAD_LOCK:
            upstream_model.llama_cpp = _LlamaCppWithOrder(getattr(settings, "layer_order", None))
            try:
                llm = upstream_model.LlamaProxy.load_llama_from_model_settings(settings)
            finally:
                upstream_model.llama_cpp = llama_cpp
        llm.__class__ = Llama  # a plain frankenllama.Llama from now on (pickles, copies, reprs as one)
        return llm

    def layer_order(self, model: str) -> str:
        """The canonical order of an alias (the one it will run, if it is not loaded now).

        Raises:
            RequestError: 404 for an unknown alias, 400 if its configured order is invalid.
        """
        alias = self.alias(model)
        if alias not in self._orders:
            try:
                self._orders[alias] = _planned_order(self._model_settings_dict[alias])
            except (ValueError, OSError) as err:
                raise RequestError(status.HTTP_400_BAD_REQUEST, f"model {alias!r}: {err}",
                                   code="invalid_layer_order", param="model") from None
        return self._orders[alias]

    def set_layer_order(self, model: str, order: Optional[List[int]]) -> str:
        """Re-order an alias (``None``: the file's own order) and return its canonical order.

        A loaded model switches with :meth:`frankenllama.Llama.set_layer_order` (transactional:
        a refused order leaves it running the old one); one that is not loaded is loaded with the
        new order.  The alias's settings keep the order, so a reload runs it too.

        Raises:
            RequestError: 404 for an unknown alias, 400 if the order is refused (with the reason).
        """
        alias = self.alias(model)
        settings = self._model_settings_dict[alias]
        llm = self._loaded.get(alias)
        if llm is None:
            previous = settings.layer_order
            settings.layer_order = None if order is None else format_spec(order)
            try:
                llm = self._load(alias)
            except RequestError:
                settings.layer_order = previous
                raise
        else:
            try:
                llm.set_layer_order(order)
            except ValueError as err:
                raise RequestError(status.HTTP_400_BAD_REQUEST,
                                   f"{err} (model {alias!r} keeps its layer order {self._orders[alias]})",
                                   code="invalid_layer_order", param="layer_order") from None
        spec = self._orders[alias] = settings.layer_order = format_spec(llm.layer_order)
        return spec

    def free(self) -> None:
        """Close every loaded model."""
        while self._loaded:
            self._loaded.popitem()[1].close()
        self._current_model = None


# --------------------------------------------------------------------------- one thread for the models


class _ModelThread:
    """Runs every call into a model on one thread, in place of starlette's ``run_in_threadpool``
    and ``iterate_in_threadpool`` in llama_cpp.server's routes.

    llama_cpp.server hands each call, and each token of a stream, to whichever thread of the pool
    is free.  llama.cpp's CPU backend (OpenMP) keeps a team of worker threads for each thread that
    decodes, so decoding from changing threads starts more teams that compete for the cores: on 2
    cores it cost a third of the streamed tokens/s (benchmarks/server_bench.py).  llama_cpp.server's
    locks serialize the requests anyway, so one thread loses nothing.  As with
    ``anyio.to_thread.run_sync``, a cancelled caller still waits for its call to end.
    """

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="frankenllama-model")

    async def run(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        future = asyncio.wrap_future(self._executor.submit(func, *args, **kwargs))
        with anyio.CancelScope(shield=True):
            return await future

    async def iterate(self, iterator: Iterator[T]) -> AsyncIterator[T]:
        while True:
            try:
                yield await self.run(_next_or_stop, iterator)
            except _Exhausted:
                return


class _Exhausted(Exception):
    """StopIteration can't travel through a future."""


def _next_or_stop(iterator: Iterator[T]) -> T:
    try:
        return next(iterator)
    except StopIteration:
        raise _Exhausted from None


_model_thread = _ModelThread()


# --------------------------------------------------------------------------- routes


class LayerOrder(BaseModel):
    """Body of ``GET``/``PUT /v1/models/{alias}/layer_order``."""

    layer_order: Optional[Union[str, List[int]]] = Field(
        ..., description="A spec ('0-20,12-29', or exllamav3 '0..20,12..29') or a list of weight-layer "
                         "indices; null: the file's own order. The server answers the canonical spec.",
        examples=["0-20,12-29"])


def _proxy() -> LlamaProxy:
    proxy = upstream._llama_proxy
    if not isinstance(proxy, LlamaProxy):
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "Service is not available")
    return proxy


#: llama_cpp.server's request locks: ``async with _between_requests() as proxy`` waits for the
#: running request (and, with interrupt_requests, asks a running stream to stop)
_between_requests = contextlib.asynccontextmanager(upstream.get_llama_proxy)


def _inline_order(value: Union[str, List[int], None]) -> Optional[List[int]]:
    """The order a PUT body gives.  Recipe files are refused: the server would read any file a
    client names (and echo its lines in error messages)."""
    if value is None or isinstance(value, list):
        return value
    try:
        return from_exl3_spec(value) if ".." in value else parse_spec(value)
    except LayerOrderError as err:
        hint = ""
        if value.strip().lower().endswith((".yaml", ".yml", ".txt", ".blocks")):
            hint = ("; a PUT takes a spec or a list of layer indices, not a recipe file: give recipe "
                    "files with --layer_order or in the config file")
        raise RequestError(status.HTTP_400_BAD_REQUEST, f"{err}{hint}", code="invalid_layer_order",
                           param="layer_order") from None


async def _known_model(request: Request, _auth: Any = Depends(upstream.authenticate)) -> None:
    """Runs before each llama_cpp.server route (after its API-key check): HTTP 404 for an unknown
    ``model`` and 400 for one that cannot be loaded, while the response can still say so (a
    streaming route has sent its 200 by the time it asks for the model)."""
    if request.method != "POST" or request.url.path.endswith(f"/{LlamaProxy.COPILOT_ALIAS}/completions"):
        return
    try:
        body = await request.json()
    except ValueError:
        return  # the route reports the malformed body
    model = body.get("model") if isinstance(body, dict) else None
    proxy = _proxy()
    alias = proxy.alias(model if isinstance(model, str) else None)
    if not proxy.is_loaded(alias):
        async with _between_requests() as locked:
            await _model_thread.run(locked, alias)


router = APIRouter(dependencies=[Depends(upstream.authenticate)], tags=["frankenllama"])


@router.get("/v1/models", summary="Models", tags=[upstream.openai_v1_tag])
async def get_models() -> Dict[str, Any]:
    """llama_cpp.server's model list; each entry also has the alias's ``layer_order``."""
    proxy = _proxy()
    models = await upstream.get_models(proxy)
    for entry in models["data"]:
        with contextlib.suppress(RequestError):
            entry["layer_order"] = None
            entry["layer_order"] = proxy.layer_order(entry["id"])
    return models  # type: ignore[return-value]


@router.get("/v1/models/{model:path}/layer_order", summary="Layer order", response_model=LayerOrder)
async def get_layer_order(model: str) -> LayerOrder:
    """The canonical layer order of a model alias."""
    return LayerOrder(layer_order=_proxy().layer_order(model))


@router.put("/v1/models/{model:path}/layer_order", summary="Re-order", response_model=LayerOrder)
async def put_layer_order(model: str, body: LayerOrder) -> LayerOrder:
    """Change an alias's layer order between requests (the conversation state is dropped).

    400 with the reason if the order is refused; the alias then keeps its previous order.
    """
    _proxy().alias(model)  # 404 before waiting for the running request
    order = _inline_order(body.layer_order)
    async with _between_requests() as proxy:
        spec = await _model_thread.run(proxy.set_layer_order, model, order)
    return LayerOrder(layer_order=spec)


# --------------------------------------------------------------------------- app and CLI


def create_app(settings: Optional[Settings] = None, server_settings: Optional[ServerSettings] = None,
               model_settings: Optional[List[ModelSettings]] = None) -> FastAPI:
    """llama_cpp.server's ``create_app`` with frankenllama models (same arguments; without any,
    the ``CONFIG_FILE`` environment variable or the environment's settings, as upstream).

    Raises:
        ValueError: the settings are invalid or the default alias cannot be loaded.
    """
    if server_settings is None and model_settings is None:
        if os.environ.get("CONFIG_FILE"):
            server_settings, model_settings = load_config_file(os.environ["CONFIG_FILE"])
        else:
            settings = settings if settings is not None else Settings()  # type: ignore[call-arg]
            server_settings = ServerSettings.model_validate(settings)
            model_settings = [ModelSettings.model_validate(settings)]
    if server_settings is None or not model_settings:
        raise ValueError("give server_settings and model_settings together")
    model_settings = [m if isinstance(m, ModelSettings) else ModelSettings.model_validate(m.model_dump())
                      for m in model_settings]

    upstream.set_server_settings(server_settings)
    upstream.run_in_threadpool = _model_thread.run  # the routes look these names up at each call
    upstream.iterate_in_threadpool = _model_thread.iterate
    app = FastAPI(middleware=[Middleware(RawContextMiddleware, plugins=(RequestIdPlugin(),))],
                  title="frankenllama (llama.cpp Python API)", version=llama_cpp.__version__,
                  root_path=server_settings.root_path)
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_credentials=True,
                       allow_methods=["*"], allow_headers=["*"])
    app.add_exception_handler(RequestError, _error_response)  # type: ignore[arg-type]
    app.include_router(router)
    app.include_router(upstream.router, dependencies=[Depends(_known_model)])
    app.router.routes = [r for r in app.router.routes  # ours lists the orders
                         if not (isinstance(r, APIRoute) and r.endpoint is upstream.get_models)]
    if upstream._llama_proxy is not None:  # an earlier app of this process: its models go first
        upstream._llama_proxy.free()
        upstream._llama_proxy = None
    upstream._llama_proxy = LlamaProxy(models=model_settings)
    if server_settings.disable_ping_events:
        upstream.set_ping_message_factory(lambda: bytes())
    return app


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    """llama_cpp.server's options (built from the settings, as upstream) plus ``--layer_order``."""
    parser = argparse.ArgumentParser(
        prog=prog, description="llama-cpp-python's OpenAI-compatible server running frankenllama models: "
                               "every llama_cpp.server option, plus --layer_order.")
    add_args_from_model(parser, Settings)
    parser.add_argument("--config_file", type=str,
                        help="Path to a config file (JSON or YAML) listing models: each may set its "
                             "own model_alias and layer_order. Overrides the other options.")
    return parser


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Start the server (``frankenllama serve``); returns 2 for bad settings or a model that
    can't be loaded, after printing the reason."""
    prog = prog or "frankenllama serve"
    args = build_parser(prog).parse_args(argv)
    try:
        config_file = os.environ.get("CONFIG_FILE", args.config_file)
        if config_file:
            server_settings, model_settings = load_config_file(config_file)
        elif args.model is None and not os.environ.get("MODEL"):
            raise ValueError("give the model to serve: --model M.gguf, or --config_file FILE listing models")
        else:
            server_settings = parse_model_from_args(ServerSettings, args)
            model_settings = [parse_model_from_args(ModelSettings, args)]
        app = create_app(server_settings=server_settings, model_settings=model_settings)
    except (ValueError, OSError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
        return 2
    uvicorn.run(app, host=os.getenv("HOST", server_settings.host),
                port=int(os.getenv("PORT", server_settings.port)),
                ssl_keyfile=server_settings.ssl_keyfile, ssl_certfile=server_settings.ssl_certfile)
    return 0
