"""``viscpm serve``: the OpenAI-compatible API and the web page, over the pipelines loaded at start-up."""
from __future__ import annotations

import argparse
import logging
import os

from ..extras import require
from ..serve import settings as limits
from .options import (
    add_context_budget_option, add_paint_checker_options, add_placement_options, add_quant_option, paint_checkers,
    placement,
)

SERVE_HELP = """Serve the models: an OpenAI-compatible HTTP API and a web page, in one process.

  POST /v1/chat/completions   chat about images (OpenAI format; image_url parts as data URLs; stream)
  POST /v1/images/generations paint (OpenAI format; b64_json)
  POST /v1/images/edits       repaint an image or a masked part of it (OpenAI's multipart form)
  GET  /v1/models, /health, / (the web page: chat and paint)

Binds 127.0.0.1 (this machine only) unless --host says otherwise; any other address needs an API
key (--api-key or the VISCPM_API_KEY environment variable), which clients send as
`Authorization: Bearer KEY`.

启动服务：兼容 OpenAI 的接口与网页（对话、绘画）。默认只监听本机 127.0.0.1；监听其他地址时必须
设置 API 密钥（--api-key 或环境变量 VISCPM_API_KEY）。

examples / 示例:
  viscpm serve                                             # the packaged models / 内置模型
  viscpm serve --chat viscpm_chat_zhplus_checkpoint.pt --no-paint --port 8080
  VISCPM_API_KEY=secret viscpm serve --host 0.0.0.0"""


def add_parser(commands) -> None:
    parser = commands.add_parser("serve", help="API server and web page / 接口服务与网页", description=SERVE_HELP,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    models = parser.add_argument_group("models")
    models.add_argument("--chat", metavar="MODEL", help="chat model: official .pt or saved folder (default: packaged)")
    models.add_argument("--chat-config", metavar="JSON", help="config of --chat, when none is beside it")
    models.add_argument("--chat-vocab", metavar="FILE", help="vocab of --chat (default: vocab.txt beside it)")
    models.add_argument("--no-chat", action="store_true", help="serve no chat model")
    models.add_argument("--paint", metavar="MODEL",
                        help="paint model: official .pt or saved folder (default: packaged)")
    models.add_argument("--paint-config", metavar="JSON", help="config of --paint, when none is beside it")
    models.add_argument("--paint-vocab", metavar="FILE", help="vocab of --paint (default: vocab.txt beside it)")
    models.add_argument("--vae", help="VAE folder of --paint (default: vae/ beside it)")
    models.add_argument("--no-paint", action="store_true", help="serve no paint model")
    models.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    add_quant_option(models)
    add_placement_options(models)
    add_paint_checker_options(parser.add_argument_group("paint safety and ranking (as in viscpm paint)"))
    network = parser.add_argument_group("network")
    network.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    network.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    network.add_argument("--api-key", help="required key (default: $VISCPM_API_KEY); needed to bind a non-local host")
    network.add_argument("--allow-remote-images", action="store_true",
                         help="let chat requests name http(s) image URLs for the server to fetch (default: "
                              "inline data URLs only; file:// is never read)")
    network.add_argument("--allow-image-network", metavar="CIDR", action="append", default=[],
                         help="with --allow-remote-images: a network images may also come from, e.g. 10.0.0.0/8 "
                              "(repeatable; by default public addresses only, never loopback or private ones)")
    network.add_argument("--allowed-hosts", metavar="NAMES", default="",
                         help="comma-separated host names the Host header may name besides localhost, 127.0.0.1, "
                              "::1 and --host (against DNS rebinding); '*' answers any (the default when --host is "
                              "0.0.0.0 or ::)")
    network.add_argument("--allow-safety-off", action="store_true",
                         help="let requests turn safety checkers off (e.g. \"prompt_safety_checker\": false); "
                              "refused with 403 by default")
    lim = parser.add_argument_group("limits")
    lim.add_argument("--max-queue", type=int, default=limits.MAX_QUEUE,
                     help="requests waiting or running per model before 429 (default %(default)s)")
    lim.add_argument("--timeout", type=float, default=limits.REQUEST_TIMEOUT_S,
                     help="seconds per request before 504 (default %(default)g)")
    lim.add_argument("--max-batch", type=int, default=limits.MAX_BATCH_SIZE,
                     help="chat requests decoded together (default %(default)s; 1 turns batching off)")
    lim.add_argument("--max-tokens", type=int, default=limits.MAX_NEW_TOKENS,
                     help="largest max_tokens a request may ask (default %(default)s)")
    add_context_budget_option(lim)
    lim.add_argument("--max-request-mb", type=float, default=limits.MAX_REQUEST_BYTES / 2**20,
                     help="largest request body in MiB (default %(default)g)")
    parser.set_defaults(run=run_serve)


def build_serve_app(args: argparse.Namespace):
    """The app ``viscpm serve`` runs: settings from the flags, pipelines loaded now."""
    from ..serve import ServeSettings, check_binding, create_app
    from ..serve.settings import allowed_hosts_for

    api_key = args.api_key or os.environ.get("VISCPM_API_KEY") or None
    check_binding(args.host, api_key)  # before minutes of loading
    if args.no_chat and args.no_paint:
        raise ValueError("--no-chat and --no-paint leave nothing to serve")
    extra_hosts = tuple(name.strip() for name in args.allowed_hosts.split(",") if name.strip())
    settings = ServeSettings(api_key=api_key, allowed_hosts=allowed_hosts_for(args.host, extra_hosts),
                             allow_remote_images=args.allow_remote_images,
                             allowed_image_networks=tuple(args.allow_image_network),
                             allow_safety_off=args.allow_safety_off, max_queue=args.max_queue,
                             request_timeout=args.timeout, max_batch_size=args.max_batch,
                             max_new_tokens=args.max_tokens,
                             default_max_new_tokens=min(args.max_tokens, ServeSettings.default_max_new_tokens),
                             max_request_bytes=int(args.max_request_mb * 2**20))
    if args.device_map not in (None, "auto"):
        raise ValueError("viscpm serve places each model with --device-map auto (module names differ between "
                         "chat and paint); pass a JSON map to viscpm chat or viscpm paint")
    placed_by_flags = placement(args)  # each model fills --max-memory on its own

    def placed(model: str) -> dict:  # one offload subfolder per model: both have llm.* weights
        folder = placed_by_flags.get("offload_folder")
        return {**placed_by_flags, "offload_folder": os.path.join(folder, model)} if folder else placed_by_flags

    chat = paint = None
    try:
        if not args.no_chat:
            from ..pipelines.chat import VisCPMChat

            chat = VisCPMChat(args.chat, args.chat_config, args.chat_vocab, device=args.device, quant=args.quant,
                              max_context_tokens=args.max_context_tokens, **placed("chat"))
        if not args.no_paint:
            from ..pipelines.paint import VisCPMPaint

            paint = VisCPMPaint(args.paint, **paint_checkers(args), vocab_path=args.paint_vocab,
                                vae_path=args.vae, config_path=args.paint_config, device=args.device,
                                quant=args.quant, **placed("paint"), progress_bar=False)
    except FileNotFoundError as error:  # most often: no packaged model yet
        raise FileNotFoundError(f"{error} (viscpm serve: pass --chat/--paint MODEL, or --no-chat/--no-paint)") from None
    return create_app(chat=chat, paint=paint, settings=settings)


def run_serve(args: argparse.Namespace) -> int:
    uvicorn = require("uvicorn", "serve", "viscpm serve")  # before the models load, which takes a while
    app = build_serve_app(args)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"viscpm serve: page 网页 http://{host}:{args.port}/  ·  API 接口 http://{host}:{args.port}/v1", flush=True)
    log_requests()
    uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning",
                access_log=False, timeout_graceful_shutdown=5)  # ours (serve.access_log) also times each request
    return 0


def log_requests() -> None:
    """One timestamped line per request on stderr, with or without -v."""
    from ..serve.access_log import logger

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # not twice under -v
