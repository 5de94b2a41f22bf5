"""What the fine-tuning service (service.py) accepts: a submitted job checked as train.py checks a
config's job, before out_dir is touched, its inputs staged outside out_dir and then stored in it
in one step; a generation request checked. A refusal is a RequestError: an HTTP status and one line.
"""
import dataclasses
import json
import os
import shutil
from pathlib import Path

import files
import generate
import jobs
import stepapi
from config import SAFE_NAME, ConfigError, RunConfig, check_path, read_job
from templates import NAMED_TEMPLATES

INPUT_FIELDS = ("data", "test_data", "template")   # the job fields that name a file
MAX_NEW_TOKENS = 1024       # a generation request's max_new_tokens
MAX_GENERATE_ROWS = 256     # prompts x adapters of one request
MAX_PROMPT_TOKENS = 4096
MAX_BATCH = 64              # jobs of one submission
# The step-level API's calls (issue 33; stepapi.Engine's methods) and the fields of each request's body.
STEP_FIELDS = {"create": tuple(stepapi.LORA_CHECKS), "load": ("name", "job"),
               "forward_backward": ("data", "loss_fn", "loss_fn_config"), "optim_step": (*stepapi.ADAM_DEFAULTS, "learning_rate"),
               "sample": ("prompt", "n", "temperature", "top_p", "max_tokens", "stop", "seed"), "save": ("name",),
               "delete": ()}
DATUM_FIELDS = tuple(f.name for f in dataclasses.fields(stepapi.Datum))


class RequestError(Exception):
    """A request the service refuses: an HTTP status and one line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if not isinstance(error, (ValueError, OSError)) else text


# ----------------------------------------------------------------------------- a submission checked, before out_dir is touched

def allowed_file(value: str, allow_dirs: list[Path], label: str) -> Path:
    """The file a job field names, every link resolved, if it lies inside an allowed folder (a
    relative path resolves against the server's working directory, as train.py's)."""
    check_path(value, "request", label)   # no NUL byte, not too long: one line
    real = Path(os.path.realpath(value))
    if not allow_dirs:
        raise RequestError(403, f"request: {label}: this server reads no folder (no --allow_dir): send the rows "
                                f"in the request instead")
    if not any(real.is_relative_to(folder) for folder in allow_dirs):
        raise RequestError(403, f"request: {label}: {value!r} is outside the folders this server reads (--allow_dir)")
    if not real.is_file():
        raise RequestError(422, f"request: {label}: file not found: {value!r} (in an allowed folder)")
    return real


def copy_file(source: Path, target: Path):
    # O_NOFOLLOW: the checked path's last part cannot have become a link since it was resolved.
    with os.fdopen(os.open(source, os.O_RDONLY | os.O_NOFOLLOW), "rb") as f, open(target, "wb") as out:
        shutil.copyfileobj(f, out)


def stage_inputs(body: dict, allow_dirs: list[Path], staging: Path) -> tuple[dict, dict[str, str], dict[str, str]]:
    """The submitted job's object with its inputs put in `staging` (a temporary folder outside
    out_dir): rows given in the request (a list for data or test_data) written one per line, so
    that line N is row N; a file path copied, once allowed_file allows it. Returns the object
    pointing at the copies, {field: where it came from}, and {field: its staged path}."""
    raw, sources, staged = dict(body), {}, {}
    for name in INPUT_FIELDS:
        value = raw.get(name)
        if isinstance(value, list) and name != "template":
            file = staging / f"{name}.jsonl"
            file.write_text("".join(json.dumps(row) + "\n" for row in value))
            sources[name] = f"uploaded ({len(value)} rows)"
        elif isinstance(value, str) and value.strip() and not (name == "template" and value in NAMED_TEMPLATES):
            real = allowed_file(value, allow_dirs, f"job.{name}")
            file = staging / f"{name}{real.suffix}"
            copy_file(real, file)
            sources[name] = value
        else:   # null, a named template, or a value read_job refuses in one line
            continue
        raw[name] = staged[name] = str(file)
    return raw, sources, staged


def relabel(message: str, staged: dict[str, str]) -> str:
    """A config.py or data.py message about the staged copies, naming the request's fields (job.data,
    not a temporary file; job.targets, not read_inputs' one-job run's jobs[0].targets)."""
    for name, path in staged.items():
        message = message.replace(path, f"job.{name}")
    return message.replace("jobs[0].", "job.")


def check_submission(body, cfg: RunConfig, allow_dirs: list[Path], staging: Path) -> tuple:
    """A submitted job checked as train.py checks a config's job (config.read_job, then
    jobs.read_inputs: the base's targets, every row), its inputs staged outside out_dir: (the job,
    its read_inputs, {field: where it came from}, {field: its staged copy})."""
    if not isinstance(body, dict):
        raise RequestError(400, f"request: expected a JSON object of job fields, got {type(body).__name__}")
    raw, sources, staged = stage_inputs(body, allow_dirs, staging)
    try:
        job = read_job(raw, "request")
    except ConfigError as e:
        raise RequestError(422, relabel(str(e), staged)) from None
    try:
        read = jobs.read_inputs(dataclasses.replace(cfg, jobs=[job]))
    except (ValueError, OSError) as e:   # ConfigError, data.DataError, a checkpoint's error
        raise RequestError(422, f"request: {relabel(one_line(e), staged)}") from None
    return job, read, sources, staged


def check_submissions(body, cfg: RunConfig, allow_dirs: list[Path], staging: Path) -> tuple[bool, list[tuple]]:
    """A submission of one job's fields or {"jobs": [...]}: (whether it is several, each one's
    check_submission, its inputs staged under staging/<i>); a refusal names jobs[i]."""
    many = isinstance(body, dict) and "jobs" in body
    bodies = body["jobs"] if many else [body]
    if not isinstance(bodies, list) or not 1 <= len(bodies) <= MAX_BATCH:
        raise RequestError(422, f"request: jobs: expected a list of 1 to {MAX_BATCH} jobs' fields")
    checked = []
    for i, one in enumerate(bodies):
        (staging / str(i)).mkdir()
        try:
            checked.append(check_submission(one, cfg, allow_dirs, staging / str(i)))
        except RequestError as e:
            raise RequestError(e.status, f"request: jobs[{i}]: {str(e).removeprefix('request: ')}" if many
                               else str(e)) from None
    names = [job.name.lower() for job, *_ in checked]
    for job, *_ in checked:
        if names.count(job.name.lower()) > 1:
            raise RequestError(409, f"request: jobs: the name {job.name!r} twice")
    return many, checked


def store_inputs(job, staged: dict[str, str], folder: Path):
    """The staged inputs into folder/<job>/, the folder put there in one step (never half written);
    the job, reading them from there."""
    target = folder / job.name
    tmp = folder / f".{job.name}.tmp-{os.getpid()}"
    files.remove(tmp)
    tmp.mkdir()
    for path in staged.values():
        files.atomic_write(tmp / Path(path).name, write=lambda to, source=path: shutil.copyfile(source, to))
    files.replace_dir(tmp, target)
    return dataclasses.replace(job, **{name: str(target / Path(path).name) for name, path in staged.items()})


def generation_request(body) -> tuple[list[str], list[str | None], int, str | None]:
    """A generation request's prompts, adapters (job names; None: the bare base), max_new_tokens
    and template (a named one, or None: each adapter's own), checked."""
    if not isinstance(body, dict):
        raise RequestError(400, f"request: expected a JSON object, got {type(body).__name__}")
    unknown = sorted(body.keys() - {"prompts", "adapters", "max_new_tokens", "template"})
    if unknown:
        raise RequestError(422, f"request: {unknown[0]}: unknown key (expected prompts, adapters, max_new_tokens, template)")
    prompts, adapters = body.get("prompts"), body.get("adapters", [None])
    max_new_tokens, template = body.get("max_new_tokens", 64), body.get("template")
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise RequestError(422, f"request: prompts: expected a non-empty list of non-empty strings, got {prompts!r:.80}")
    if not isinstance(adapters, list) or not adapters or not all(a is None or isinstance(a, str) for a in adapters):
        raise RequestError(422, f"request: adapters: expected a non-empty list of job names (null: the base), "
                                f"got {adapters!r:.80}")
    if len(prompts) * len(adapters) > MAX_GENERATE_ROWS:
        raise RequestError(422, f"request: {len(prompts)} prompts x {len(adapters)} adapters: at most "
                                f"{MAX_GENERATE_ROWS} rows")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise RequestError(422, f"request: max_new_tokens: expected 1 to {MAX_NEW_TOKENS}, got {max_new_tokens!r}")
    if template is not None and template not in NAMED_TEMPLATES:
        raise RequestError(422, f"request: template: expected one of {', '.join(NAMED_TEMPLATES)}, got {template!r:.80}")
    return prompts, adapters, max_new_tokens, template


def generation_rows(tokenizer, prompts: list[str], adapters: list[str | None], templates: dict) -> tuple[list, list[str]]:
    """Each prompt through each adapter's template: (prompt ids, adapter) rows, and each row's text."""
    rows, texts = [], []
    for text in prompts:
        for name in adapters:
            try:
                ids = generate.encode_prompt(tokenizer, text, templates[name])
            except ValueError as e:   # data.DataError: a template that cannot read it
                raise RequestError(422, f"request: template of {name or 'the base'}: {one_line(e)}") from None
            if len(ids) > MAX_PROMPT_TOKENS:
                raise RequestError(422, f"request: prompts: {len(ids)} tokens, at most {MAX_PROMPT_TOKENS}")
            rows.append((ids, name))
            texts.append(text)
    return rows, texts


# ----------------------------------------------------------------------------- a step-level API call

def step_arguments(kind: str, lora_id: str | None, body) -> object:
    """A step-level API request's arguments for stepapi.Engine, its shape checked (the engine
    checks the values and refuses in one line): create a config, load a saved name, forward_backward
    a stepapi.Call, optim_step the Adam settings, sample a stepapi.SampleCall, save a name."""
    if not isinstance(body, dict):
        raise RequestError(400, f"request: expected a JSON object, got {type(body).__name__}")
    unknown = sorted(body.keys() - set(STEP_FIELDS[kind]))
    if unknown:
        raise RequestError(422, f"request: {unknown[0]}: unknown key (expected {', '.join(STEP_FIELDS[kind]) or 'none'})")
    if kind in ("load", "save"):
        source = "job" if kind == "load" and "job" in body else "name"
        name = body.get(source)
        if kind == "load" and len(body) != 1:
            raise RequestError(422, "request: load: expected either name (a LoRA saved here) or job (an ended job's adapter)")
        if not isinstance(name, str) or SAFE_NAME.fullmatch(name) is None:
            raise RequestError(422, f"request: {source}: expected letters, digits, '_', '.', '-' (a letter or digit first), "
                                    f"got {name!r:.80}")
        return (source, name) if kind == "load" else name
    if kind == "forward_backward":
        data = body.get("data")
        if not isinstance(data, list) or not data or not all(isinstance(d, dict) for d in data):
            raise RequestError(422, f"request: data: expected a non-empty list of objects, got {data!r:.80}")
        for i, datum in enumerate(data):
            if extra := sorted(datum.keys() - set(DATUM_FIELDS)) or sorted({"tokens", "targets"} - datum.keys()):
                raise RequestError(422, f"request: data[{i}]: {extra[0]}: expected the fields {', '.join(DATUM_FIELDS)} "
                                        f"(tokens and targets required)")
        return stepapi.Call(lora_id, [stepapi.Datum(**d) for d in data], body.get("loss_fn", "cross_entropy"),
                            body.get("loss_fn_config"))
    if kind == "sample":
        if "prompt" not in body:
            raise RequestError(422, "request: prompt: required (a list of token ids)")
        return stepapi.SampleCall(lora_id, **body)
    return body   # create's config, optim_step's settings, delete's nothing

