"""Prompt template files, read and checked once: Alpaca-LoRA's JSON, m-LoRA's JSON (2023, 2024)
and m-LoRA's 2025 YAML or Jinja, which renders whole rows (bounded as chat templates are:
tokenizer.render_template). data.py's templates name one by its path.
"""
import string
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from tokenizer import SURROGATE, DataError, compile_template, one_line, read_json, read_text, render_template

NAMED_TEMPLATES = ("alpaca", "mlora", "chat", "plain")   # data.py's own; any other name is a file's path


ROW_FIELDS = ("instruction", "input")  # what a JSON template's prompt may hold; {output} goes in the response


@dataclass(frozen=True)
class TemplateFile:
    """A prompt template file, read and checked once (template_file). Its format is told by its keys:
    alpaca-lora  {"prompt_input", "prompt_no_input", "description"?, "response_split"?}: the prompts;
                 the response is the row's output
    mlora        m-LoRA's JSON, 2023 {"parameter", "prompt", "prompt_no_input", "description"} and 2024
                 {"prompt", "prompt_no_input", "description", "response"}: each text holds {output}; the
                 prompt is what comes before it, the response the output and what follows it
    jinja        m-LoRA's 2025 YAML {"template": ...} (or a .jinja file): renders a whole row (data_point)
    """
    path: str
    format: str  # "alpaca-lora", "mlora" or "jinja"
    prompts: tuple[str, str] = ("", "")  # str.format texts of the prompt: of a row with an input, without
    suffixes: tuple[str, str] = ("", "")  # the same, of what follows the output in the response (mlora)
    # Which rows take the no-input form: "empty" (input missing or ""), "missing" (no input field),
    # "never" (an m-LoRA template whose choice does not look at the input; see _mlora_template).
    no_input_when: str = "empty"
    jinja: object = None  # the compiled template (jinja)


def _placeholders(path: str, key: str, text, allowed: tuple[str, ...]) -> list[str]:
    """The names of text's str.format placeholders, each plain and one of allowed (the row fills
    them); a literal brace is written {{ or }}."""
    if not isinstance(text, str):
        raise DataError(f"{path}: '{key}' must be a string, got {type(text).__name__}")
    try:
        fields = [(name, conversion, spec) for _, name, spec, conversion in string.Formatter().parse(text)
                  if name is not None]
    except ValueError as e:  # a stray brace: "Single '}' encountered in format string"
        raise DataError(f"{path}: '{key}': {e} (write a literal brace as {{{{ or }}}})") from None
    for name, conversion, spec in fields:
        if name not in allowed or conversion or spec:
            placeholder = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            names = [f"{{{field}}}" for field in allowed]
            why = " (the response is the row's output, written after the prompt)" if name == "output" else ""
            raise DataError(f"{path}: '{key}' has a bad placeholder {one_line(placeholder, 60)}: "
                            f"only {', '.join(names[:-1])} and {names[-1]} are filled{why}")
    return [name for name, _, _ in fields]


def _split_at_output(text: str) -> tuple[str, str]:
    # An m-LoRA text "...{output}..." (placeholders checked) as two str.format texts: before and after {output}.
    parts, current = [], []
    for literal, name, _, _ in string.Formatter().parse(text):
        current.append(literal.replace("{", "{{").replace("}", "}}"))
        if name == "output":
            parts.append("".join(current))
            current = []
        elif name is not None:
            current.append("{" + name + "}")
    return parts[0], "".join(current)


def _read_template_object(file: Path) -> dict:
    # The object a template file holds: JSON, YAML (.yaml/.yml), or a bare Jinja template (.jinja).
    if file.suffix == ".jinja":
        return {"template": read_text(file)}
    if file.suffix not in (".yaml", ".yml"):
        return read_json(file)
    import yaml  # only m-LoRA's YAML templates need it
    try:
        spec = yaml.safe_load(read_text(file))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise DataError(f"{file}: cannot parse YAML ({one_line(getattr(e, 'problem', None) or e)}{at})") from None
    except (ValueError, RecursionError) as e:  # a bad date (2024-13-01), nesting too deep
        raise DataError(f"{file}: cannot parse YAML ({type(e).__name__}: {one_line(e)})") from None
    if not isinstance(spec, dict):
        raise DataError(f"{file}: expected a YAML mapping (template: ...), got {type(spec).__name__}")
    return spec


@lru_cache(maxsize=None)
def template_file(path: str) -> TemplateFile:
    # Read and checked once, so that a bad file fails before any row; the format comes from the keys.
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{path}: template file not found (named templates: {', '.join(NAMED_TEMPLATES)})")
    spec = _read_template_object(file)
    formats = {"prompt_input": "alpaca-lora", "prompt": "mlora", "template": "jinja"}
    found = [key for key in formats if key in spec]
    if not found:
        raise DataError(f"{path}: missing key 'prompt_input' (alpaca-lora's format), 'prompt' (m-LoRA's JSON) "
                        "or 'template' (m-LoRA's YAML)")
    if len(found) > 1:
        raise DataError(f"{path}: keys '{found[0]}' ({formats[found[0]]}) and '{found[1]}' ({formats[found[1]]}) "
                        "are of two template formats; keep one")
    kind = formats[found[0]]
    if kind == "jinja":  # m-LoRA's prompter reads "template" only
        if not isinstance(spec["template"], str):
            raise DataError(f"{path}: 'template' must be a string, got {type(spec['template']).__name__}")
        return TemplateFile(path, kind, jinja=compile_template(spec["template"], file, what="template"))
    keys = ("prompt_input", "prompt_no_input") if kind == "alpaca-lora" else ("prompt", "prompt_no_input")
    for key in keys:
        if key not in spec:
            raise DataError(f"{path}: missing key '{key}'")
        if kind == "alpaca-lora":
            _placeholders(path, key, spec[key], ROW_FIELDS)
    for key in ("description", "response_split" if kind == "alpaca-lora" else "response"):
        if not isinstance(spec.get(key, ""), str):
            raise DataError(f"{path}: '{key}' must be a string, got {type(spec[key]).__name__}")
    if kind == "alpaca-lora":
        return TemplateFile(path, kind, prompts=(spec["prompt_input"], spec["prompt_no_input"]))
    return _mlora_template(path, spec)


def _mlora_template(path: str, spec: dict) -> TemplateFile:
    """m-LoRA's JSON template: "prompt" and "prompt_no_input" each hold {output} once."""
    names = {}
    for key in ("prompt", "prompt_no_input"):
        names[key] = _placeholders(path, key, spec[key], ROW_FIELDS + ("output",))
        if names[key].count("output") != 1:
            raise DataError(f"{path}: '{key}' must hold {{output}} once (where the row's output goes), "
                            f"it has {names[key].count('output')}")
    # Which rows m-LoRA gave prompt_no_input. 2023 (aspen/dataset.py): a row lacking a field that
    # "parameter" lists; 2024 (mlora/prompter/prompter.py): a row on which "prompt".format(**row)
    # failed, i.e. lacking a field it uses. Rows here always have instruction and output, so both
    # come down to "the row has no input field" when that field counts; an empty input takes "prompt".
    if "parameter" in spec:
        parameters = spec["parameter"]
        if not (isinstance(parameters, list) and all(isinstance(name, str) for name in parameters)):
            raise DataError(f"{path}: 'parameter' must be a list of field names, got {one_line(parameters, 60)}")
        unknown = [name for name in parameters if name not in ROW_FIELDS + ("output",)]
        if unknown:
            raise DataError(f"{path}: 'parameter' lists {one_line(unknown[0], 60)!r}: rows fill only "
                            "instruction, input and output")
        input_counts = "input" in parameters
    else:
        input_counts = "input" in names["prompt"]
    (prompt, suffix), (prompt_no_input, suffix_no_input) = (_split_at_output(spec[key])
                                                            for key in ("prompt", "prompt_no_input"))
    return TemplateFile(path, "mlora", prompts=(prompt, prompt_no_input), suffixes=(suffix, suffix_no_input),
                        no_input_when="missing" if input_counts else "never")


def jinja_template(template: str) -> TemplateFile | None:
    # The template file when it is a Jinja one (it renders whole rows of any fields), else None.
    if template in NAMED_TEMPLATES:
        return None
    spec = template_file(str(template))
    return spec if spec.format == "jinja" else None


def file_texts(spec: TemplateFile, instruction: str, input: str | None, output: str) -> tuple[str, str]:
    # (prompt, response) of a row by a JSON template file; input None: the row has no input field.
    if spec.format == "jinja":
        raise DataError(f"{spec.path}: a Jinja template renders whole rows; it has no prompt of its own")
    if spec.no_input_when == "empty":
        form = 0 if input else 1
    else:
        form = 1 if input is None and spec.no_input_when == "missing" else 0
    fill = {"instruction": instruction, "input": input or ""}
    return spec.prompts[form].format(**fill), output + spec.suffixes[form].format(**fill)


def render_row(spec: TemplateFile, row: dict, **flags) -> str:
    """A Jinja template file's text of one row, as m-LoRA's prompter renders it: data_point=row
    (and is_chosen for preference data), bounded as chat templates are (tokenizer.render_template)."""
    text = render_template(spec.jinja, Path(spec.path), dict(data_point=row, **flags), len(str(row)), what="template")
    bad = SURROGATE.search(text)
    if bad:
        raise DataError(f"{spec.path}: the rendered text has a lone surrogate \\u{ord(bad.group()):04x} "
                        f"at character {bad.start()}, which is not text")
    return text
