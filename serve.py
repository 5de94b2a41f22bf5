"""A fine-tuning service: jobs submitted over HTTP to one running fused trainer (service.py), and
its client for scripts.

    python serve.py --base_model DIR [--out_dir out/serve] [--host 127.0.0.1 --port 8000] [--allow_dir DIR ...]
    python serve.py submit JOB.json [--data ROWS.jsonl] [--test_data ROWS.jsonl] | submit CONFIG.json
    python serve.py status [JOB] [--since S] | cancel JOB | download JOB [--to FILE]
    python serve.py generate --adapter JOB [--adapter JOB ...] [--base] --prompt TEXT [--max-new-tokens N]

The API, JSON under /v1; every endpoint but the two last needs `Authorization: Bearer TOKEN`:
    POST /v1/jobs                 a job's fields, as in a config file's jobs list; data and test_data
                                  are the rows themselves (a list) or a file inside an --allow_dir folder;
                                  or {"jobs": [...]}: several, all or none, queued at the same turn
    GET  /v1/jobs[/JOB]           state (waiting, training, finished, stopped, failed), step, loss,
                                  held-out metrics, tokens/s
    GET  /v1/jobs/JOB/metrics?since=S     its step and evaluation lines after fused step S
    POST /v1/jobs/JOB/cancel      it stops, keeping its best adapter; its slot goes to a waiting job
    GET  /v1/jobs/JOB/adapter     its adapter, the PEFT folder as a .tar.gz
    POST /v1/generate             {"prompts": [TEXT, ...], "adapters": [JOB or null (the base), ...],
                                  "max_new_tokens": N}: requests arriving together share one batch
    The step-level API (stepclient.py is its Python client; the client owns the loop):
    POST /v1/loras                a LoRA's config (r, alpha, dropout, targets, variant, ...) -> its id
    POST /v1/loras/ID/forward_backward    {"data": [{tokens, targets, weights?, logprobs?, advantages?}],
                                  "loss_fn": cross_entropy | importance_sampling | ppo} -> log-probs, loss
    POST /v1/loras/ID/optim_step  Adam settings (lr, beta1, beta2, eps, weight_decay, grad_clip_norm)
    POST /v1/loras/ID/sample      {"prompt": ids, "n", "temperature", "top_p", "max_tokens", "stop", "seed"}
    POST /v1/base/sample          the same, of the bare base
    POST /v1/loras/ID/save        {"name": NAME}: out_dir/_api/NAME; POST /v1/loras/load {"name": NAME}
                                  (or {"job": JOB}: an ended job's adapter, to go on from it)
    DELETE /v1/loras/ID;  GET /v1/saved/NAME     a saved LoRA as a .tar.gz
                                  Calls of different LoRAs that wait together run as ONE fused pass.
    GET  /v1/health               is it up
    GET  /                        a page (serve.html) of the jobs through this API, with the token pasted
                                  in: state, progress, loss curve, cancel, a submit form
A refused request is a 4xx with {"error": "one line"}. The token is $SERVE_TOKEN, else the one in
OUT_DIR/_service/token, made on the first start and readable by its owner alone. The client finds
the server at --url (default $SERVE_URL, else http://127.0.0.1:8000) and the token as the server does.
"""
import argparse
import hmac
import json
import os
import secrets
import socket
import sys
from pathlib import Path

import files

TOKEN_ENV, URL_ENV = "SERVE_TOKEN", "SERVE_URL"
TOKEN_FILE = "_service/token"   # in out_dir: service.SERVICE_DIR, a name no job can take
OPEN_PATHS = ("/v1/health", "/")   # no token needed: the page holds no data (it asks for the token)
PAGE = Path(__file__).with_name("serve.html")
# The page runs its own inline script, and talks to this server alone.
PAGE_HEADERS = {"content-security-policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                           "connect-src 'self'; frame-ancestors 'none'", "x-content-type-options": "nosniff"}
CLIENT_COMMANDS = ("submit", "status", "cancel", "download", "generate")


class ServeError(Exception):
    """A problem the command line reports in one line (exit status 2)."""


# ----------------------------------------------------------------------------- the token

def server_token(out_dir: str) -> str:
    """$SERVE_TOKEN, else out_dir's token file: made on the first start from `secrets`, its
    owner's alone (0600); one that others may read is refused (it may have leaked)."""
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV]
    file = Path(out_dir) / TOKEN_FILE
    if file.exists():
        mode = file.stat().st_mode & 0o777
        if mode & 0o077:
            raise ServeError(f"{file}: others may read it (mode {mode:o}); remove it for a new token")
        token = file.read_text().strip()
        if token:
            return token
    token = secrets.token_urlsafe(32)
    file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    files.write_private(file, token + "\n")
    return token


def client_token(out_dir: str) -> str:
    """$SERVE_TOKEN, else the server's token file in out_dir."""
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV]
    file = Path(out_dir) / TOKEN_FILE
    try:
        return file.read_text().strip()
    except OSError:
        raise ServeError(f"no token: set ${TOKEN_ENV}, or pass the server's --out_dir ({file} not readable)") from None


# ----------------------------------------------------------------------------- HTTP

def guard(app, token: str, max_body: int):
    """ASGI around the app: every path but OPEN_PATHS needs `Authorization: Bearer TOKEN` (compared
    in constant time), and a body over max_body bytes is refused with 413, by its Content-Length or,
    without one (chunked), as its bytes arrive."""
    from service import RequestError
    expected = f"Bearer {token}".encode()
    too_large = f"request: body over {max_body} bytes (--max_body_mb)"

    async def reply(send, status: int, message: str, headers: tuple = ()):
        body = json.dumps({"error": message}).encode()
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]})
        await send({"type": "http.response.body", "body": body})

    async def guarded(scope, receive, send):
        if scope["type"] != "http":   # lifespan
            return await app(scope, receive, send)
        headers = dict(scope["headers"])
        if scope["path"] not in OPEN_PATHS and not hmac.compare_digest(headers.get(b"authorization", b""), expected):
            return await reply(send, 401, "request: missing or wrong bearer token (Authorization: Bearer TOKEN)",
                               ((b"www-authenticate", b"Bearer"),))
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body):
            return await reply(send, 413, too_large)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > max_body:   # raised in the endpoint reading the body: its error handler answers
                raise RequestError(413, too_large)
            return message
        await app(scope, limited_receive, send)
    return guarded


def make_app(service):
    """The API over a service.Service (see this file's docstring); guard() adds the token and the body limit."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from service import RequestError

    app = FastAPI(title="multi-LoRA fine-tuning service", docs_url=None, redoc_url=None, openapi_url=None)
    add_error_answers(app)

    def since_of(request: Request) -> int:
        try:
            return int(request.query_params.get("since", "0"))
        except ValueError:
            raise RequestError(422, f"request: since: expected a fused step (an integer), "
                                    f"got {request.query_params['since']!r:.40}") from None

    page = PAGE.read_text()

    @app.get("/")
    def index():
        return HTMLResponse(page, headers=PAGE_HEADERS)

    @app.get("/v1/health")
    def health():
        return {"status": "ok"} if service.healthy() else JSONResponse({"error": "the trainer has stopped"}, 503)

    @app.post("/v1/jobs")
    async def submit(request: Request):
        return JSONResponse(await run_in_threadpool(service.submit, await body_json(request)), 201)

    # Reads answer at once from what the trainer published (no thread hop, no encoder pass: the
    # cheapest requests, and the most frequent).
    @app.get("/v1/jobs")
    async def list_jobs():
        return JSONResponse({"jobs": service.list_jobs()})

    @app.get("/v1/jobs/{name}")
    async def job(name: str):
        return JSONResponse(service.job(name))

    @app.get("/v1/jobs/{name}/metrics")
    async def metrics(name: str, request: Request):
        return JSONResponse(service.metrics(name, since_of(request)))

    @app.post("/v1/jobs/{name}/cancel")
    def cancel(name: str):
        return JSONResponse(service.cancel(name), 202)

    @app.get("/v1/jobs/{name}/adapter")
    def adapter(name: str):
        return Response(service.adapter_archive(name), media_type="application/gzip",
                        headers={"content-disposition": f'attachment; filename="{name}.tar.gz"'})

    @app.post("/v1/generate")
    async def generate(request: Request):
        return await run_in_threadpool(service.generate, await body_json(request))

    add_step_api(app, service)
    return app


def add_error_answers(app):
    """Every refusal and error as {"error": "one line"}: a RequestError's status, no such path or
    method, anything else a 500."""
    from fastapi import Request
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException
    from service import RequestError

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status)

    @app.exception_handler(RequestError)
    async def refused(request: Request, e: RequestError):
        return error(e.status, str(e))

    @app.exception_handler(HTTPException)   # no such path, or method
    async def not_routed(request: Request, e: HTTPException):
        return error(e.status_code, f"request: {request.method} {request.url.path}: {str(e.detail).lower()}")

    @app.exception_handler(Exception)
    async def failed(request: Request, e: Exception):
        return error(500, f"internal error: {type(e).__name__}: {' '.join(str(e).split())}")


async def body_json(request):
    """A request's body as JSON, or a 400 of one line."""
    from service import RequestError
    try:
        return json.loads(await request.body())
    except (ValueError, RecursionError) as e:   # not UTF-8, not JSON, nested too deep
        raise RequestError(400, f"request: the body is not JSON ({' '.join(str(e).split())[:200]})") from None


def add_step_api(app, service):
    """The step-level API (issue 33; stepapi.Engine behind service.step_api): the client owns the
    loop, each call on one LoRA; calls of different LoRAs that wait together run fused."""
    from fastapi import Request
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from service import RequestError

    async def call(kind: str, lora_id: str | None, request: Request, status: int = 200):
        body = await body_json(request) if kind != "delete" else {}
        return JSONResponse(await run_in_threadpool(service.step_api, kind, lora_id, body), status)

    @app.post("/v1/loras")
    async def create(request: Request):
        return await call("create", None, request, 201)

    @app.post("/v1/loras/load")
    async def load(request: Request):
        return await call("load", None, request, 201)

    @app.post("/v1/base/sample")
    async def sample_base(request: Request):
        return await call("sample", None, request)

    @app.post("/v1/loras/{lora_id}/{kind}")
    async def act(lora_id: str, kind: str, request: Request):
        if kind not in ("forward_backward", "optim_step", "sample", "save"):
            raise RequestError(404, f"request: POST /v1/loras/{lora_id}/{kind}: not found (forward_backward, "
                                    f"optim_step, sample, save)")
        return await call(kind, lora_id, request)

    @app.delete("/v1/loras/{lora_id}")
    async def delete(lora_id: str, request: Request):
        return await call("delete", lora_id, request)

    @app.get("/v1/saved/{name}")
    def saved(name: str):
        return Response(service.saved_archive(name), media_type="application/gzip",
                        headers={"content-disposition": f'attachment; filename="{name}.tar.gz"'})


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free one; its number is sock.getsockname()[1])."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def uvicorn_server(app):
    import uvicorn
    return uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))


# ----------------------------------------------------------------------------- the server's command line

def server_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="serve.py", description="Serve one fused trainer: jobs submitted over HTTP "
                                     "train together (client: serve.py submit|status|cancel|download|generate -h).")
    parser.add_argument("--base_model", required=True, help="Hugging Face checkpoint folder")
    parser.add_argument("--out_dir", default="out/serve", help="the run's files, the job registry, the token")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port")
    parser.add_argument("--allow_dir", action="append", default=[],
                        help="a folder whose files jobs may name as data, test_data or template (repeatable)")
    parser.add_argument("--max_body_mb", type=float, default=64, help="largest request body, MiB")
    parser.add_argument("--strategy", default="trivial", help="the scheduler's strategy (scheduler.py)")
    parser.add_argument("--max_candidates", type=int, default=4, help="jobs admitted at once")
    parser.add_argument("--max_concurrent", type=int, default=2, help="jobs fused into one step")
    parser.add_argument("--token_budget", type=int, default=None, help="fast-fit: processed tokens per step")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quant", default=None)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--api_nice", type=int, default=10,
                        help="the HTTP side's niceness, above the trainer's (0: the same priority)")
    parser.add_argument("--api_linger", type=float, default=0.005,
                        help="seconds the trainer waits, once step-level API calls came, for others to fuse with")
    parser.add_argument("--checkpoint_every", type=int, default=50,
                        help="the run checkpoint every N fused steps (and at close): a restart goes on from it")
    return parser.parse_args(argv)


def server_main(argv: list[str]) -> int:
    """Load the base, start the trainer, serve until Ctrl-C. Exit status 2 on bad input (one line)."""
    args = server_args(argv)
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        print(f"error: serve.py needs {e.name}: pip install fastapi uvicorn", file=sys.stderr)
        return 2
    import remote
    from config import ConfigError, RunConfig, SchedulerConfig
    cfg = RunConfig(base_model=args.base_model, out_dir=args.out_dir, dtype=args.dtype, device=args.device,
                    quant=args.quant, seed=args.seed, checkpoint_every=args.checkpoint_every,
                    scheduler=SchedulerConfig(strategy=args.strategy, max_candidates=args.max_candidates,
                                              max_concurrent=args.max_concurrent, token_budget=args.token_budget))
    try:
        if not args.max_body_mb > 0:
            raise ServeError(f"--max_body_mb: expected a number > 0, got {args.max_body_mb}")
        sock = bind(args.host, args.port)
        if not args.api_linger >= 0:
            raise ServeError(f"--api_linger: expected seconds >= 0, got {args.api_linger}")
        service = remote.start(cfg, args.allow_dir, args.api_linger)   # the trainer, in a process of its own
        os.nice(args.api_nice)   # this process only: the trainer's steps come first
    except (ServeError, ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        token = server_token(args.out_dir)
        host, port = sock.getsockname()[:2]
        where = f"${TOKEN_ENV}" if os.environ.get(TOKEN_ENV) else str(Path(args.out_dir) / TOKEN_FILE)
        print(f"serving {args.out_dir} on http://{args.host}:{port}/ (token: {where})")
        if host not in ("127.0.0.1", "::1"):
            print(f"warning: listening on {host}: anyone who reaches it with the token can train and read "
                  "adapters, over plain HTTP (put TLS in front)")
        uvicorn_server(guard(make_app(service), token, int(args.max_body_mb * 2**20))).run(sockets=[sock])
    except KeyboardInterrupt:   # Ctrl-C, as uvicorn raises it again once it has stopped: how one stops it
        pass
    except ServeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        service.close()
    return 0


# ----------------------------------------------------------------------------- the client

def client_args(argv: list[str]) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get(URL_ENV, "http://127.0.0.1:8000"), help="the server")
    common.add_argument("--out_dir", default="out/serve", help=f"the server's out_dir: its token (unless ${TOKEN_ENV})")
    parser = argparse.ArgumentParser(prog="serve.py", description="The service's client; prints the server's JSON.")
    commands = parser.add_subparsers(dest="command", required=True)
    submit = commands.add_parser("submit", parents=[common], help="submit a job (a JSON file of its fields), or a "
                                 "config's jobs together (their data files uploaded)")
    submit.add_argument("job")
    submit.add_argument("--data", help="upload these rows (.json or .jsonl) as the job's data")
    submit.add_argument("--test_data", help="upload these rows as its test_data")
    status = commands.add_parser("status", parents=[common], help="every job's state, or one's")
    status.add_argument("name", nargs="?")
    status.add_argument("--since", type=int, default=None, help="its metrics lines after this fused step instead")
    commands.add_parser("cancel", parents=[common], help="stop a job, keeping its best adapter").add_argument("name")
    download = commands.add_parser("download", parents=[common], help="a job's adapter, as JOB.tar.gz")
    download.add_argument("name")
    download.add_argument("--to", help="the archive's path (default: JOB.tar.gz)")
    generate = commands.add_parser("generate", parents=[common], help="greedy answers of ended jobs' adapters")
    generate.add_argument("--adapter", action="append", default=[], help="a job's name (repeatable)")
    generate.add_argument("--base", action="store_true", help="also the bare base (the default with no --adapter)")
    generate.add_argument("--prompt", action="append", required=True, help="repeatable")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    return parser.parse_args(argv)


def request(args: argparse.Namespace, method: str, path: str, body=None) -> bytes:
    """One call of the API (stepclient's); its error as a ServeError of the server's line."""
    import stepclient
    try:
        return stepclient.ServiceClient(args.url, client_token(args.out_dir)).request(method, path, body)
    except stepclient.StepError as e:
        raise ServeError(str(e)) from None


def read_rows(path: str) -> list:
    """Rows of a .json list or a .jsonl file, to upload (the server checks each)."""
    try:
        text = Path(path).read_text()
        return [json.loads(line) for line in text.splitlines() if line.strip()] if path.endswith(".jsonl") \
            else json.loads(text)
    except (OSError, ValueError) as e:
        raise ServeError(f"{path}: {e}") from None


def client_main(argv: list[str]) -> int:
    """One client command; prints the server's answer (JSON), or one line and exit status 2."""
    args = client_args(argv)
    try:
        if args.command == "submit":
            answer = request(args, "POST", "/v1/jobs", submission(args))
        elif args.command == "status" and args.name is None:
            answer = request(args, "GET", "/v1/jobs")
        elif args.command == "status":
            metrics = "" if args.since is None else f"/metrics?since={args.since}"
            answer = request(args, "GET", f"/v1/jobs/{args.name}{metrics}")
        elif args.command == "cancel":
            answer = request(args, "POST", f"/v1/jobs/{args.name}/cancel")
        elif args.command == "download":
            target = Path(args.to or f"{args.name}.tar.gz")
            files.atomic_write(target, request(args, "GET", f"/v1/jobs/{args.name}/adapter"))
            answer = json.dumps({"job": args.name, "archive": str(target)}).encode()
        else:
            adapters = args.adapter + ([None] if args.base or not args.adapter else [])
            answer = request(args, "POST", "/v1/generate", {"prompts": args.prompt, "adapters": adapters,
                                                            "max_new_tokens": args.max_new_tokens})
    except ServeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(json.loads(answer), indent=1))
    return 0


def submission(args: argparse.Namespace) -> dict:
    """What `submit FILE` sends: one job's fields (--data, --test_data: rows to upload instead of
    its files), or, for a config file (a "jobs" list), every job with the rows of its data and
    test_data files uploaded (read here, relative to this directory, as train.py reads them)."""
    try:
        body = json.loads(read_file(args.job))
    except ValueError as e:
        raise ServeError(f"{args.job}: not JSON ({e})") from None
    if not isinstance(body, dict):
        raise ServeError(f"{args.job}: expected a JSON object of job fields, or a config with a jobs list")
    if isinstance(body.get("jobs"), list):
        if args.data or args.test_data:
            raise ServeError(f"{args.job}: a config's jobs upload their own files (no --data or --test_data)")
        jobs = [dict(job) if isinstance(job, dict) else job for job in body["jobs"]]
        for job in jobs:
            for name in ("data", "test_data"):
                if isinstance(job, dict) and isinstance(job.get(name), str):
                    job[name] = read_rows(job[name])
        return {"jobs": jobs}
    for name in ("data", "test_data"):
        if getattr(args, name):
            body[name] = read_rows(getattr(args, name))
    return body


def read_file(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as e:
        raise ServeError(f"{path}: {e.strerror}") from None


def main(argv: list[str]) -> int:
    if argv and argv[0] in CLIENT_COMMANDS:
        return client_main(argv)
    return server_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
