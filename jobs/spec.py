"""The job spec: what a user asks for, validated before anything starts.

A YAML file (``vidprune run job.yaml``) plus ``--set a.b=value`` overrides becomes a
:class:`JobSpec`. Only ``input.uri`` and ``output.uri`` are required. Every problem is
reported by its key path (``pruning.r``, ``resources.actors``) in one :class:`SpecError`
(exit code 2), and nothing is written. docs/SPEC.md is the reference.

``pruning`` holds the method and that method's parameters side by side
(``{method: eventful, policy: top_r, r: 256}``); the parameters are checked against the
method's own ``Params`` dataclass (``models/methods``), so a method added to the registry is
configurable here without touching this file.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, TypeAdapter, ValidationError,
                      ValidationInfo, field_validator, model_serializer, model_validator)
from pydantic_core import InitErrorDetails, PydanticCustomError

from .errors import UserError

#: The shipped zoo models the spec defaults to, per task (``models/zoo/<name>.json``).
DEFAULT_MODELS = {"detection": "vitdet-synth", "recognition": "videomae-synth"}
#: The default pruning method per task, for models whose card names none (checkpoints).
DEFAULT_METHODS = {"detection": "eventful", "recognition": "sta"}
TASKS = ("detection", "recognition")
DEFAULT_PATTERNS = ["*.mp4", "*.mkv", "*.avi", "*.mov", "*.webm", "*.m4v", "*.mpg", "*.mpeg",
                    "*.ts", "*.flv", "*.wmv", "*.3gp"]
_SCHEMES = ("file", "s3")
_CREDENTIAL_WORDS = ("key", "secret", "token", "password", "credential", "session")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Today's rules are lower case, digits, '.' and '-'; older us-east-1 buckets may also have
# capitals and '_'.
_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$")
_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")


class SpecError(UserError):
    """An invalid job spec; ``problems`` lists ``(key path, message)`` pairs."""

    def __init__(self, problems: list[tuple[str, str]], source: str = "job spec"):
        self.problems = problems
        lines = "\n".join(f"  {path or '(top level)'}: {msg}" for path, msg in problems)
        n = len(problems)
        super().__init__(f"invalid {source} ({n} problem{'s' if n != 1 else ''}):\n{lines}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


def _fail(key: str, message: str) -> ValidationError:
    """An error located at ``key`` of the model being validated (the caller raises it)."""
    return ValidationError.from_exception_data("spec", [InitErrorDetails(
        type=PydanticCustomError("spec", message.replace("{", "{{").replace("}", "}}")),
        loc=(key,), input=None)])


def _check_uri(uri: str) -> str:
    uri = uri.strip()
    if not uri:
        raise ValueError("must not be empty")
    if any(ord(c) < 32 or ord(c) == 127 for c in uri) or "\x00" in uri:
        raise ValueError("must not contain control characters")
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else "file"
    if scheme not in _SCHEMES:
        raise ValueError(f"unsupported scheme {scheme!r}: use a local path or s3://bucket/prefix")
    if scheme == "s3":
        rest = uri.split("://", 1)[1]
        if not rest.strip("/"):
            raise ValueError("an s3:// URI needs a bucket: s3://bucket/prefix")
        if "?" in rest or "#" in rest or "@" in rest.split("/", 1)[0]:
            raise ValueError("no query strings or user info in URIs (credentials come from "
                             "the environment: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)")
        bucket, _, key = rest.partition("/")
        if not _BUCKET.match(bucket):
            raise ValueError(f"{bucket!r} is not a valid bucket name (letters, digits, '.', "
                             "'-' and '_')")
        # S3 keys are taken literally, but most tools resolve '..' and '//': a prefix that
        # means different objects to different readers is refused.
        if any(part in (".", "..") for part in key.split("/")) or "//" in key.rstrip("/"):
            raise ValueError("no '.', '..' or empty segments in an s3:// key")
        return uri
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return os.path.abspath(os.path.expanduser(path))


class StorageSpec(_Strict):
    """How to reach an object store. Credentials never go here: they come from the
    environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
    ``AWS_PROFILE``, instance roles)."""

    endpoint_url: str | None = None  # S3-compatible stores (MinIO, Ceph, R2 ...)
    region: str | None = None
    anon: bool = False               # public buckets, unsigned requests

    @model_validator(mode="before")
    @classmethod
    def _no_credentials(cls, data: Any) -> Any:
        if isinstance(data, dict):
            secret = [k for k in data if isinstance(k, str) and k not in cls.model_fields
                      and any(w in k.lower() for w in _CREDENTIAL_WORDS)]
            if secret:
                raise PydanticCustomError(
                    "credentials_in_spec",
                    "credentials do not belong in the job spec ({keys}); set them in the "
                    "environment instead: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and "
                    "AWS_SESSION_TOKEN), or AWS_PROFILE",
                    {"keys": ", ".join(sorted(secret))})
        return data

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is None:
            return v
        v = v.strip()
        if "://" not in v:
            v = f"https://{v}"  # HTTPS unless plain HTTP is asked for explicitly
        m = re.match(r"^(https?)://([^/?#\s]+)(/[^?#\s]*)?$", v)
        if not m:
            raise ValueError("must be https://host[:port] (or http:// for a store that only "
                             "speaks plain HTTP)")
        if "@" in m.group(2):
            raise ValueError("no user info or query strings: credentials come from the "
                             "environment")
        return v.rstrip("/")

    def plain_http(self) -> bool:
        """The endpoint is plain HTTP on another machine: requests (signed, but not
        encrypted) and data cross the network in the clear."""
        if not self.endpoint_url or not self.endpoint_url.startswith("http://"):
            return False
        host = self.endpoint_url[len("http://"):].split("/", 1)[0].rsplit(":", 1)[0]
        return host.lower() not in _LOOPBACK_HOSTS and not host.startswith("127.")

    def options(self) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint_url, "region": self.region, "anon": self.anon}


class InputSpec(_Strict):
    uri: str
    patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_PATTERNS), min_length=1)
    storage: StorageSpec = Field(default_factory=dict)

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        return _check_uri(v)


class ModelSpec(_Strict):
    """A zoo model by ``name``, or an architecture ``arch`` with a ``checkpoint``."""

    task: Literal["detection", "recognition"] | None = None  # default: the model's task
    name: str | None = None          # default: the zoo model of the task (DEFAULT_MODELS)
    arch: str | None = None
    checkpoint: str | None = None    # local path or s3:// URI (.safetensors, .pth, ...)
    options: dict[str, Any] = Field(default_factory=dict)  # architecture options (arch only)
    labels: list[str] | None = None  # class names for arch + checkpoint
    input_size: int | None = Field(default=None, ge=16, le=4096)  # default: the model's
    score_threshold: float = Field(default=0.3, ge=0.0, le=1.0)   # detections below: dropped
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on CUDA
    top_k: int = Field(default=5, ge=1, le=100_000)  # recognition: predictions per clip

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint(cls, v: str | None) -> str | None:
        return None if v is None else _check_uri(v)

    @model_validator(mode="after")
    def _resolve(self) -> "ModelSpec":
        from models import ARCHS, zoo_entries

        if self.name and (self.arch or self.checkpoint):
            raise _fail("name", "give either name (a zoo model) or arch with checkpoint, "
                                "not both")
        if self.arch is not None:
            if self.arch not in ARCHS:
                raise _fail("arch", f"unknown architecture '{self.arch}'; available: "
                                    f"{', '.join(sorted(ARCHS))}")
            arch_task = ARCHS[self.arch].task
            if arch_task not in TASKS:
                raise _fail("arch", f"'{self.arch}' is a {arch_task} architecture; vidprune "
                                    f"annotates videos with {' or '.join(TASKS)} models")
            if not self.checkpoint:
                raise _fail("checkpoint", f"architecture '{self.arch}' needs a checkpoint (its "
                                          "trained weights); or name a zoo model instead")
            self._set_task(arch_task)
            return self
        for key in ("checkpoint", "options", "labels"):
            if getattr(self, key):
                raise _fail(key, "goes with arch; a zoo model (name) comes with its own")
        zoo = zoo_entries()
        if self.name is None:
            self.name = DEFAULT_MODELS[self.task or "detection"]
        if self.name not in zoo:
            raise _fail("name", f"unknown zoo model '{self.name}'; installed: "
                                f"{', '.join(sorted(zoo)) or '(none)'}; or give arch "
                                f"({', '.join(sorted(ARCHS))}) with a checkpoint")
        self._set_task(ARCHS[zoo[self.name].arch].task)
        return self

    def _set_task(self, task: str) -> None:
        if self.task is not None and self.task != task:
            raise _fail("task", f"is '{self.task}' but the model is a {task} model")
        self.task = task  # type: ignore[assignment]


class PruningSpec(BaseModel):
    """The method and its parameters, kept flat in YAML: ``{method: eventful, r: 256}``."""

    model_config = ConfigDict(extra="forbid")
    method: str
    params: dict[str, Any] = Field(default_factory=dict)

    @model_serializer
    def _flat(self) -> dict[str, Any]:
        return {"method": self.method, **self.params}


class DecodeSpec(_Strict):
    fps: float | None = Field(default=None, gt=0, le=1000)  # null: every frame
    segment_frames: int = Field(default=2048, ge=1, le=10_000_000)  # long videos are split
    clip_frames: int | None = Field(default=None, ge=1, le=4096)  # recognizers; null: model's
    frame_stride: int = Field(default=4, ge=1, le=10_000)  # recognizers: every k-th frame
    timeout_s: float = Field(default=120.0, gt=0, le=86_400)  # a decoder without progress
    retries: int = Field(default=2, ge=0, le=10)              # fresh decoders per segment
    backend: Literal["pyav", "decord"] = "pyav"  # what decodes in the child (docs/SPEC.md)


class ResourcesSpec(_Strict):
    actors: int = Field(default=1, ge=1, le=100_000)
    gpus_per_actor: float = Field(default=0.0, ge=0, le=64)
    cpus_per_actor: float = Field(default=1.0, gt=0, le=1024)
    streams_per_actor: int = Field(default=1, ge=1, le=1024)  # segments run in lockstep
    memory_per_actor_gib: float | None = Field(default=None, gt=0, le=16384)  # null: estimate


class OutputSpec(_Strict):
    uri: str
    mode: Literal["resume", "overwrite", "error"] = "resume"
    storage: StorageSpec | None = None  # default: input.storage

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        return _check_uri(v)


class JobSpec(_Strict):
    name: str | None = None  # default: derived from input.uri
    input: InputSpec
    model: ModelSpec = Field(default_factory=dict)
    pruning: PruningSpec | None = None  # default: the zoo card's method, else DEFAULT_METHODS
    decode: DecodeSpec = Field(default_factory=dict)
    resources: ResourcesSpec = Field(default_factory=dict)
    output: OutputSpec

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not _NAME.match(v):
            raise ValueError("1-64 letters, digits, '.', '_' or '-', starting with a letter "
                             "or digit")
        return v

    @field_validator("pruning", mode="before")
    @classmethod
    def _pruning(cls, value: Any, info: ValidationInfo) -> Any:
        return resolve_pruning(value, info.data.get("model"))

    @model_validator(mode="after")
    def _defaults(self) -> "JobSpec":
        if self.name is None:
            self.name = name_from_uri(self.input.uri)
        if self.pruning is None:
            self.pruning = PruningSpec(**resolve_pruning({}, self.model))
        if self.output.storage is None:
            self.output.storage = self.input.storage.model_copy()
        return self

    # -- what the pipeline needs -------------------------------------------------------------
    def model_config_dict(self) -> dict[str, Any]:
        """The model section (and decode.clip_frames) as the annotator takes it."""
        return {**self.model.model_dump(), "clip_frames": self.decode.clip_frames}

    def as_dict(self) -> dict[str, Any]:
        """The spec as run (defaults filled in), for ``job.json``. It holds no secrets:
        the spec cannot carry any."""
        return self.model_dump(mode="json")


def resolve_pruning(value: Any, model: "ModelSpec | None") -> dict[str, Any]:
    """The ``pruning`` section as given (None, a mapping or a PruningSpec) to
    ``{method, params}``: the method defaults to the zoo card's ``default_method``, else the
    task's (DEFAULT_METHODS); parameters to the card's operating point for the method, else
    the method's own defaults."""
    if value is None:
        value = {}
    if isinstance(value, PruningSpec):
        value = value.model_dump()
    if not isinstance(value, dict):
        raise ValueError("must be a mapping: {method: NAME, <parameter>: value, ...}")
    value = dict(value)
    method = value.pop("method", None)
    if method is not None and not isinstance(method, str):
        raise _fail("method", "must be the name of a pruning method")
    default = method is None
    if model is None:  # the model section is invalid: reported there
        return {"method": method or "none", "params": value}
    card = card_pruning(model.name)
    if default:
        method = card.get("default_method") or DEFAULT_METHODS[model.task]
    from models import METHODS

    if method not in METHODS:
        what = f"'{method}' (the default for {model.task})" if default else f"'{method}'"
        raise _fail("method", f"unknown pruning method {what}; available: "
                              f"{', '.join(sorted(METHODS))}")
    # A zoo model's card names the operating point chosen for it (on its validation
    # split); parameters the spec gives win over it, the method's defaults fill the rest.
    point = card.get("operating_points", {}).get(method, {})
    return {"method": method, "params": validate_method_params(method, {**point, **value})}


def card_pruning(zoo_name: str | None) -> dict[str, Any]:
    """The ``pruning`` section of a zoo model's card: ``default_method`` and
    ``operating_points`` (method -> parameters), or {} (no zoo model, or no such section)."""
    if zoo_name is None:
        return {}
    from models import zoo_entries

    entry = zoo_entries().get(zoo_name)
    return dict(entry.card.get("pruning") or {}) if entry else {}


def validate_method_params(method: str, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` checked against the method's ``Params`` dataclass (errors raised as a
    ValidationError located at each parameter); returns them with defaults filled in."""
    from models import METHODS

    params_cls = METHODS[method].Params
    fields = {f.name for f in dataclasses.fields(params_cls)}
    errors: list[InitErrorDetails] = []
    for key in params:
        if key not in fields:
            errors.append(InitErrorDetails(
                type=PydanticCustomError(
                    "unknown_parameter",
                    "unknown parameter of method '{method}'; its parameters: {names}",
                    {"method": method, "names": ", ".join(sorted(fields)) or "(none)"}),
                loc=(key,), input=params[key]))
    known = {k: v for k, v in params.items() if k in fields}
    validated = None
    try:
        validated = TypeAdapter(params_cls).validate_python(known)
    except ValidationError as exc:
        for e in exc.errors():
            loc = tuple(e["loc"])
            if not loc:  # a value the method's checks refuse: at the key its message names
                word = str(e.get("ctx", {}).get("error", "")).split(" ", 1)[0].rstrip(":")
                loc = (word,) if word in fields else ()
            errors.append(InitErrorDetails(
                type=PydanticCustomError("method_parameter", e["msg"]), loc=loc,
                input=e.get("input")))
    if errors:
        raise ValidationError.from_exception_data("pruning", errors)
    return dataclasses.asdict(validated)


def name_from_uri(uri: str) -> str:
    """``s3://bucket/videos/`` -> ``videos``; ``/data/archive`` -> ``archive``."""
    last = uri.rstrip("/").split("://", 1)[-1].rstrip("/").rsplit("/", 1)[-1]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", last).strip("-._")[:64]
    return name or "job"


# -- loading ---------------------------------------------------------------------------------

def parse_overrides(items: list[str] | None) -> list[tuple[list[str], Any]]:
    """``a.b=value`` strings to (key path, YAML-parsed value)."""
    out = []
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not p for p in key.split(".")):
            raise UserError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. "
                            "--set resources.actors=4")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
            raise UserError(
                f"--set {item!r}: the value is not valid YAML ({problem}); a value that starts "
                f"with a YAML character (* & ! | > % @ ` [ {{) is text only in quotes, e.g. "
                f"--set '{key}=\"{raw.strip()}\"' (or a list: '{key}=[\"...\"]')") from None
        out.append((key.split("."), value))
    return out


def apply_overrides(data: dict[str, Any], overrides: list[tuple[list[str], Any]]
                    ) -> list[str]:
    """Set each override in ``data`` (creating sections as needed). Setting
    ``pruning.method`` to another method drops the parameters the new method does not have
    (a spec written for one method stays usable with ``--set pruning.method=none``).
    Returns notes on what was dropped."""
    from models import METHODS

    notes = []
    for path, value in overrides:
        node = data
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        if path == ["pruning", "method"] and node.get("method") != value and value in METHODS:
            fields = {f.name for f in dataclasses.fields(METHODS[value].Params)}
            dropped = sorted(k for k in node if k != "method" and k not in fields)
            for k in dropped:
                del node[k]
            if dropped:
                notes.append(f"pruning.method={value}: dropped parameters of the previous "
                             f"method: {', '.join(dropped)}")
        node[path[-1]] = value
    return notes


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _problems(exc: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for e in exc.errors():
        msg = e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required"
        problems.append((_path(tuple(e["loc"])), msg))
    return problems


def validate_spec(data: Any, source: str = "job spec") -> JobSpec:
    """A :class:`JobSpec` from plain data, or a :class:`SpecError` listing every problem."""
    if not isinstance(data, dict):
        raise SpecError([("", "a job spec is a mapping of sections (input, output, ...)")],
                        source)
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_problems(exc), source) from None


def load_spec(path: str | os.PathLike | None, overrides: list[str] | None = None,
              base: dict[str, Any] | None = None) -> tuple[JobSpec, list[str]]:
    """Read a YAML spec (or start from ``base``), apply ``--set`` overrides, validate.
    Returns the spec and notes for the user."""
    data: dict[str, Any] = dict(base or {})
    source = "job spec"
    if path is not None:
        p = Path(path)
        source = f"job spec {p}"
        try:
            text = p.read_text()
        except OSError as exc:
            raise UserError(f"cannot read the job spec {p}: {exc.strerror or exc}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UserError(f"{p} is not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise SpecError([("", "a job spec is a mapping of sections (input, output, ...)")],
                            source)
        data.update(loaded)
    notes = apply_overrides(data, parse_overrides(overrides))
    spec = validate_spec(data, source)
    for url in sorted({s.endpoint_url for s in (spec.input.storage, spec.output.storage)
                       if s.plain_http()}):
        notes.append(f"the S3 endpoint {url} is plain HTTP: requests are signed but not "
                     "encrypted, so data (and the access key id) cross the network in the "
                     "clear; use https:// unless the store is on a trusted network")
    return spec, notes
