"""`atoll generate` and `atoll serve` (registered through atoll.cli).

atoll generate RUN --prompt TEXT [--chat] [--max-new-tokens N] [--temperature T] [--top-k K]
               [--top-p P] [--repetition-penalty R] [--stop STR ...] [--seed S]
atoll serve RUN [--host 127.0.0.1] [--port 8000] [--api-key KEY | ATOLL_API_KEY=KEY]
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from atoll.errors import AtollError

log = logging.getLogger("atoll.serve")


def _load(run: Path, device: str, *, threads: int = 0) -> tuple[Any, Any]:
    from atoll.parallel.dist import inference_device
    from atoll.rundir.load import load_stage

    return load_stage(run, device=inference_device(device, threads=threads))


# ---------------------------------------------------------------- generate


def _cmd_generate(args: argparse.Namespace, extra: list[str]) -> int:
    from atoll.serve.textgen import SamplingParams, complete, encode_prompt

    model, tokenizer = _load(args.run, args.device, threads=args.threads)
    prompt = args.prompt
    if args.chat:
        prompt = tokenizer.render_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
    ids = encode_prompt(tokenizer, prompt, max_tokens=model.cfg.max_seq_len)
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        stop=tuple(args.stop),
        seed=args.seed,
    )
    completion = complete(model, tokenizer, ids, params)
    out = sys.stdout
    if not args.chat:
        out.write(args.prompt)
    t0 = time.perf_counter()
    for piece in completion:
        out.write(piece)
        out.flush()
    seconds = time.perf_counter() - t0
    out.write("\n")
    out.flush()
    print(
        (
            f"[{completion.num_tokens} tokens in {seconds:.2f}s, "
            f"{completion.num_tokens / max(seconds, 1e-9):.1f} tokens/s; finished by "
            f"{completion.finish_reason}]"
        ),
        file=sys.stderr,
    )
    return 0


# ---------------------------------------------------------------- serve


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise AtollError(
            f"cannot listen on {host}:{port} ({exc.strerror}): choose another --port (0 picks a free one)"
        ) from None
    sock.listen(128)  # accept connections from now on; uvicorn serves them once it starts
    return sock


def _cmd_serve(args: argparse.Namespace, extra: list[str]) -> int:
    import uvicorn

    from atoll.serve.api import Limits, create_app
    from atoll.serve.engine import Engine

    api_key = args.api_key or os.environ.get("ATOLL_API_KEY") or None
    for name in ("max_prompt_tokens", "max_tokens", "max_choices", "max_queue"):
        if getattr(args, name) < 1:
            raise AtollError(f"--{name.replace('_', '-')} must be at least 1")
    model, tokenizer = _load(args.run, args.device, threads=args.threads)
    limits = Limits(
        max_prompt_tokens=min(args.max_prompt_tokens, model.cfg.max_seq_len - 1),
        max_tokens=args.max_tokens,
        max_choices=args.max_choices,
    )
    name = args.model_name or Path(args.run).resolve().name
    if not _is_loopback(args.host) and api_key is None:
        log.warning(
            "serving on %s without an API key: anyone who can reach this address can use the model (set ATOLL_API_KEY)",
            args.host,
        )
    if tokenizer.template_is_default:
        log.info("no chat template beside the tokenizer in %s: using atoll's default", args.run)
    sock = _bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    engine = Engine(model, tokenizer, max_queue=args.max_queue)
    app = create_app(engine, model_name=name, limits=limits, api_key=api_key)
    shown = f"[{host}]" if ":" in host else host
    print(
        (
            f"atoll serve: model {name!r} at http://{shown}:{port}/v1 (API key "
            f"{'required' if api_key else 'not required'}); Ctrl-C stops"
        ),
        flush=True,
    )
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    finally:
        engine.close()
        sock.close()
    return 0


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument(
        "--top-p",
        type=float,
        default=None,
        help="nucleus sampling: the smallest set of tokens with this much probability",
    )
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 makes tokens already present less likely")
    p.add_argument("--stop", action="append", default=[], metavar="STR", help="stop before this string (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="make sampling reproducible")


def register(sub: Any) -> None:
    """Add `atoll generate` and `atoll serve` to the CLI's sub-parsers."""
    p = sub.add_parser("generate", help="continue a prompt with a run's model, streaming the text to the terminal")
    p.add_argument("run", type=Path, help="a run directory (pre-training or fine-tuning) or a Hugging Face directory")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the stage's chat template as a user turn")
    _add_sampling_args(p)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: its default)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=_cmd_generate, allow_overrides=False)

    p = sub.add_parser("serve", help="serve a run's model over an OpenAI-compatible HTTP API")
    p.add_argument("run", type=Path, help="a run directory (pre-training or fine-tuning) or a Hugging Face directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: a free one, printed at start)")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (better: set ATOLL_API_KEY)")
    p.add_argument("--model-name", default=None, help="the model id clients use (default: the run directory's name)")
    p.add_argument(
        "--max-prompt-tokens", type=int, default=1024, help="longest prompt accepted (capped by the model's context)"
    )
    p.add_argument("--max-tokens", type=int, default=256, help="largest max_tokens a request may ask for")
    p.add_argument("--max-choices", type=int, default=4, help="most completions per request (prompts x n)")
    p.add_argument("--max-queue", type=int, default=16, help="requests waiting at most; more get 429")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: its default)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=_cmd_serve, allow_overrides=False)
