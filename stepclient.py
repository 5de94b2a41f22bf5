"""A Python client of the service's step-level API (issue 33): the client owns the training loop,
the server (serve.py) owns the model. The names follow Tinker's public client, so that a loop
written for one moves to the other with few changes:

    import stepclient
    service = stepclient.ServiceClient("http://127.0.0.1:8000", out_dir="out/serve")
    lora = service.create_lora(r=8, alpha=16, targets=["q_proj", "v_proj"])
    fb = lora.forward_backward([{"tokens": ids[:-1], "targets": ids[1:], "weights": w}], "cross_entropy")
    step = lora.optim_step(lr=1e-4)         # queued behind forward_backward: no wait between them
    print(fb.result()["loss"], step.result()["step"])
    done = lora.sample(prompt_ids, n=4, temperature=1.0, max_tokens=32, stop=["\\n"], seed=0).result()
    lora.save("my-lora").result()           # out_dir/_api/my-lora: a PEFT folder (service.download_saved)

Every call returns a concurrent.futures.Future. One LoRA's calls go to the server one after
another, in the order they were made (each client has its own worker), so forward_backward and
optim_step can be queued together; different LoRAs' calls run at once, and the server fuses the
ones that wait together into one forward/backward (or one batched generation). A refused call
raises StepError(status, one line) from result(). Only the standard library is needed here.
"""
import dataclasses
import json
import os
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

TOKEN_ENV, URL_ENV = "SERVE_TOKEN", "SERVE_URL"   # as serve.py's client


class StepError(Exception):
    """A call the server refused or could not answer: its HTTP status and one line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class ServiceClient:
    """The server at `url` (default $SERVE_URL, else http://127.0.0.1:8000) with its token
    (default $SERVE_TOKEN, else out_dir/_service/token, as serve.py's client finds it)."""

    def __init__(self, url: str | None = None, token: str | None = None, out_dir: str = "out/serve"):
        self.url = (url or os.environ.get(URL_ENV) or "http://127.0.0.1:8000").rstrip("/")
        self.token = token or os.environ.get(TOKEN_ENV) or read_token(out_dir)
        self.pool = ThreadPoolExecutor(4, thread_name_prefix="stepclient")   # calls not tied to a LoRA

    def request(self, method: str, path: str, body=None) -> bytes:
        """One HTTP call; a refusal as StepError with the server's line."""
        headers = {"authorization": f"Bearer {self.token}", "content-type": "application/json"}
        data = None if body is None else json.dumps(body).encode()
        call = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(call, timeout=3600) as response:
                return response.read()
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read())["error"]
            except (ValueError, KeyError, TypeError):
                message = f"HTTP {e.code} {e.reason}"
            raise StepError(e.code, message) from None
        except (urllib.error.URLError, OSError) as e:
            raise StepError(503, f"cannot reach {self.url}: {getattr(e, 'reason', e)}") from None

    def post(self, path: str, body=None) -> dict:
        return json.loads(self.request("POST", path, {} if body is None else body))

    def create_lora(self, **config) -> "TrainingClient":
        """A new LoRA on the server's base: r, alpha, dropout, targets, variant, init, use_rslora,
        seed, init_as (stepapi.LORA_CHECKS); waits for its id."""
        return TrainingClient(self, self.post("/v1/loras", config)["lora_id"])

    def load(self, name: str | None = None, *, job: str | None = None) -> "TrainingClient":
        """A LoRA saved as `name`, to continue (its optimizer state too); or job=JOB: the adapter a
        job of the service trained (train.py's, e.g. RL after SFT), with a fresh optimizer."""
        return TrainingClient(self, self.post("/v1/loras/load", {"job": job} if job else {"name": name})["lora_id"])

    def sample_base(self, prompt: list[int], n: int = 1, **params) -> Future:
        """Completions of the bare base model (params: as TrainingClient.sample's)."""
        return self.pool.submit(self.post, "/v1/base/sample", {"prompt": list(prompt), "n": n, **params})

    def download_saved(self, name: str, to) -> Path:
        """A saved LoRA's folder as a .tar.gz at `to`."""
        Path(to).write_bytes(self.request("GET", f"/v1/saved/{name}"))
        return Path(to)


class TrainingClient:
    """One LoRA on the server. Its calls run one after another in the order made (one worker)."""

    def __init__(self, service: ServiceClient, lora_id: str):
        self.service, self.lora_id = service, lora_id
        self.worker = ThreadPoolExecutor(1, thread_name_prefix=lora_id)

    def call(self, kind: str, body: dict) -> Future:
        return self.worker.submit(self.service.post, f"/v1/loras/{self.lora_id}/{kind}", body)

    def forward_backward(self, data: list, loss_fn: str = "cross_entropy", loss_fn_config: dict | None = None) -> Future:
        """Gradients of the loss over `data` accumulated on the server; the result: {"logprobs":
        each datum's per-token log-probs of its targets, "loss": the sum}. A datum: tokens, targets
        (tokens shifted by one), and optional weights, logprobs, advantages (a dict or a dataclass
        such as stepapi.Datum). loss_fn: cross_entropy, importance_sampling or ppo (stepapi.LOSSES)."""
        body = {"data": [as_dict(d) for d in data], "loss_fn": loss_fn}
        if loss_fn_config is not None:
            body["loss_fn_config"] = loss_fn_config
        return self.call("forward_backward", body)

    def optim_step(self, adam: dict | None = None, **settings) -> Future:
        """AdamW on the accumulated gradients (lr, beta1, beta2, eps, weight_decay, grad_clip_norm);
        the result: {"step": steps taken}."""
        return self.call("optim_step", {**(adam or {}), **settings})

    def sample(self, prompt: list[int], n: int = 1, **params) -> Future:
        """n completions of the prompt (temperature, top_p, max_tokens, stop: ids and strings, seed);
        the result: {"completions": [{"tokens", "logprobs", "stop_reason"}, ...]}."""
        return self.call("sample", {"prompt": list(prompt), "n": n, **params})

    def save(self, name: str) -> Future:
        """The LoRA as a PEFT folder on the server (out_dir/_api/NAME) with its optimizer state."""
        return self.call("save", {"name": name})

    def delete(self) -> Future:
        return self.worker.submit(lambda: json.loads(self.service.request("DELETE", f"/v1/loras/{self.lora_id}")))


def as_dict(datum) -> dict:
    return dataclasses.asdict(datum) if dataclasses.is_dataclass(datum) else dict(datum)


def read_token(out_dir: str) -> str:
    file = Path(out_dir) / "_service" / "token"
    try:
        return file.read_text().strip()
    except OSError:
        raise StepError(401, f"no token: set ${TOKEN_ENV}, or pass the server's out_dir ({file} not readable)") from None
