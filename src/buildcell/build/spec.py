"""The versioned build spec, ``buildcell.yaml``: strict models, and errors that name a line.

A spec is read in two steps. :func:`buildcell._yaml.read_yaml` turns the text into plain
Python data and remembers where each value came from; it refuses duplicate keys, keys that
are not strings, tags other than the plain YAML ones and documents that aliases blow up,
and it allows merge keys (``<<``). Pydantic then validates the data against
:class:`BuildSpec`. Every problem is one line,
``<file>:<line>: <field>: <what is wrong and what was expected>``, and raised as a
:class:`~buildcell.errors.SpecError`: a problem with the YAML stops the reading at once;
the validation reports every error, in file order, the first as the message and the others
in the error's ``details``.

Scalars are read as YAML 1.1 (what PyYAML's safe loader does), with one exception:
timestamps stay strings, so ``name: 2024-01-01`` is the name ``"2024-01-01"``.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import os
import posixpath
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn, TypeVar, get_args, get_origin
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    GetJsonSchemaHandler,
    StrictBool,
    StrictInt,
    StrictStr,
    Tag,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, ErrorDetails, PydanticCustomError

from buildcell import confined
from buildcell._text import show
from buildcell._yaml import Document, Loc, Site, YamlProblem, field_path, read_yaml
from buildcell.errors import ConfigError, SpecError
from buildcell.units import parse_cpus, parse_duration, parse_size

__all__ = [
    "BuildSpec",
    "DirRootfsSpec",
    "HostRootfsSpec",
    "InputSpec",
    "LimitsSpec",
    "LoadedSpec",
    "OciRootfsSpec",
    "OutputSpec",
    "SecretUse",
    "StepSpec",
    "load_spec",
    "parse_spec",
    "spec_json_schema",
]

#: The spec version this buildcell reads.
SPEC_VERSION = 1
#: Larger files are refused before they are parsed.
MAX_SPEC_BYTES = 1 << 20
#: Bound on YAML nodes after alias expansion, so a small "billion laughs" file stays small.
MAX_NODES = 100_000
#: Bound on nesting (and merge-key chains); a build spec is at most a few levels deep.
MAX_DEPTH = 64

_NAME = r"[a-z0-9][a-z0-9._-]{0,62}"
_ENV_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_HEX64 = r"[0-9a-fA-F]{64}"
_NAME_RE = re.compile(_NAME)
_ENV_NAME_RE = re.compile(_ENV_NAME)
_HEX64_RE = re.compile(_HEX64)
_PIDS_RE = re.compile(r"\s*[0-9]{1,18}\s*")
_CONTROL_RE = re.compile(r"[\x00-\x20\x7f]")

_Loc = Loc


# --- checks shared by the models ------------------------------------------------------------


def _fail(message: str, *, at: _Loc = ()) -> NoReturn:
    """Report a validation problem; ``at`` locates it below the field being validated."""
    # The message travels in ctx rather than in the template, so braces in it stay literal.
    raise PydanticCustomError("buildcell", "{message}", {"message": message, "at": at})


def _show(value: object) -> str:
    return show(value, 60)


def _no_nul(value: str) -> str:
    if "\0" in value:
        _fail("must not contain a NUL character")
    return value


def _check_name(value: str) -> str:
    if _NAME_RE.fullmatch(value) is None:
        _fail(
            f"invalid name {_show(value)}: expected 1 to 63 lowercase letters, digits, '.', '_' "
            "or '-', starting with a letter or digit"
        )
    return value


def _check_env_name(value: str) -> str:
    if _ENV_NAME_RE.fullmatch(value) is None:
        _fail(
            f"invalid environment variable name {_show(value)}: expected letters, digits and "
            "'_', not starting with a digit"
        )
    return value


def _check_run(value: str) -> str:
    if not value.strip():
        _fail("must not be empty: expected a shell command")
    return _no_nul(value)


def _check_not_empty(value: str) -> str:
    if not value:
        _fail("must not be empty")
    return _no_nul(value)


def _check_spec_relative(value: str) -> str:
    _check_not_empty(value)
    if value.startswith("/"):
        _fail(
            f"invalid file {_show(value)}: an input file is named relative to the spec's "
            "directory and must lie inside it"
        )
    return value


def _check_sha256(value: str) -> str:
    if _HEX64_RE.fullmatch(value):
        return value.lower()
    if value.startswith("sha256:") and _HEX64_RE.fullmatch(value[7:]):
        _fail(f"invalid sha256 {_show(value)}: write the 64 hexadecimal digits without 'sha256:'")
    _fail(f"invalid sha256 {_show(value)}: expected 64 hexadecimal digits")


def _check_digest(value: str) -> str:
    if value.startswith("sha256:") and _HEX64_RE.fullmatch(value[7:]):
        return value.lower()
    _fail(f"invalid digest {_show(value)}: expected 'sha256:' followed by 64 hexadecimal digits")


def _check_url(value: str) -> str:
    if _CONTROL_RE.search(value):
        _fail(f"invalid URL {_show(value)}: contains whitespace or control characters")
    try:
        parts = urlsplit(value)
    except ValueError as e:
        _fail(f"invalid URL {_show(value)}: {e}")
    if not parts.scheme:
        _fail(f"invalid URL {_show(value)}: expected an http:// or https:// URL")
    if parts.scheme.lower() not in ("http", "https"):
        _fail(f"unsupported URL scheme {parts.scheme!r}: expected an http:// or https:// URL")
    if not parts.hostname:
        _fail(f"invalid URL {_show(value)}: no host")
    if parts.username is not None or parts.password is not None:
        # A spec is committed and ends up in provenance: credentials must not live in it.
        _fail("the URL must not contain credentials (user:password@)")
    return value


def _check_input_path(value: str) -> str:
    if not value:
        _fail("must not be empty: expected a path relative to /workspace")
    _no_nul(value)
    if value.startswith("/"):
        _fail(f"invalid path {_show(value)}: expected a path relative to /workspace, not absolute")
    if ".." in value.split("/"):
        _fail(
            f"invalid path {_show(value)}: '..' is not allowed; expected a path inside /workspace"
        )
    normal = posixpath.normpath(value)
    if normal == ".":
        _fail(f"invalid path {_show(value)}: expected a file inside /workspace, not /workspace")
    return normal


def _check_output(value: str) -> str:
    if not value.strip():
        _fail("must not be empty: expected a glob pattern relative to /workspace")
    _no_nul(value)
    if value.startswith("/"):
        _fail(f"invalid output {_show(value)}: expected a pattern relative to /workspace")
    if ".." in value.split("/"):
        _fail(f"invalid output {_show(value)}: '..' is not allowed")
    return value


def _kind(value: object) -> str:
    """How YAML data is named to users: ``a string``, ``a list``, ``a mapping``..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


_N = TypeVar("_N", int, float)


def _to_unit(
    value: object, parse: Callable[[Any], _N], what: str, example: str, *, floats: bool = True
) -> _N | None:
    """Run a unit parser on a YAML value; every failure becomes one validation message."""
    if value is None:
        return None
    accepted: tuple[type, ...] = (int, float, str) if floats else (int, str)
    if isinstance(value, bool) or not isinstance(value, accepted):
        _fail(f"invalid {what} {_show(value)}: expected {example}")
    try:
        return parse(value)
    except ConfigError as e:
        _fail(e.message)
    except OverflowError:
        _fail(f"invalid {what} {_show(value)}: too large")


def _to_size(value: object) -> int | None:
    return _to_unit(value, parse_size, "size", "a size such as 512M or 2GiB", floats=False)


def _to_duration(value: object) -> float | None:
    return _to_unit(value, parse_duration, "duration", "a duration such as 90s, 5m, 1h30m")


def _to_cpus(value: object) -> float | None:
    return _to_unit(value, parse_cpus, "cpus", "a number such as 2 or 0.5")


def _to_pids(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, str) and _PIDS_RE.fullmatch(value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(f"invalid pids {_show(value)}: expected a whole number such as 512")
    if value <= 0:
        _fail(f"invalid pids {value}: must be greater than zero")
    return value


# JSON Schema of the unit fields: what the before-validators accept, for editors.
_SIZE_SCHEMA: JsonSchemaValue = {
    "anyOf": [
        {"type": "integer", "exclusiveMinimum": 0},
        {
            "type": "string",
            "pattern": r"^\s*[0-9]+(\.[0-9]+)?\s*([bB]|[kKmMgGtT]([iI][bB]?|[bB])?)?\s*$",
        },
        {"type": "null"},
    ],
}
_DURATION_SCHEMA: JsonSchemaValue = {
    "anyOf": [
        {"type": "number", "exclusiveMinimum": 0},
        {
            "type": "string",
            "pattern": r"^\s*([0-9]+(\.[0-9]+)?|([0-9]+(\.[0-9]+)?([mM][sS]|[hHmMsS]))+)\s*$",
        },
        {"type": "null"},
    ],
}
_CPUS_SCHEMA: JsonSchemaValue = {
    "anyOf": [
        {"type": "number", "minimum": 0.01},
        {"type": "string", "pattern": r"^\s*[0-9]*\.?[0-9]+\s*$"},
        {"type": "null"},
    ],
}
_PIDS_SCHEMA: JsonSchemaValue = {
    "anyOf": [
        {"type": "integer", "minimum": 1},
        {"type": "string", "pattern": r"^\s*[0-9]+\s*$"},
        {"type": "null"},
    ],
}

_Name = Annotated[
    StrictStr,
    AfterValidator(_check_name),
    WithJsonSchema({"type": "string", "pattern": f"^{_NAME}$"}),
]
_EnvName = Annotated[StrictStr, AfterValidator(_check_env_name)]
_EnvValue = Annotated[StrictStr, AfterValidator(_no_nul)]
_Env = Annotated[
    dict[_EnvName, _EnvValue],
    WithJsonSchema(
        {
            "type": "object",
            "propertyNames": {"pattern": f"^{_ENV_NAME}$"},
            "additionalProperties": {"type": "string"},
        }
    ),
]
_Sha256 = Annotated[
    StrictStr,
    AfterValidator(_check_sha256),
    WithJsonSchema({"type": "string", "pattern": f"^{_HEX64}$"}),
]
_Digest = Annotated[
    StrictStr,
    AfterValidator(_check_digest),
    WithJsonSchema({"type": "string", "pattern": f"^sha256:{_HEX64}$"}),
]
_Url = Annotated[
    StrictStr,
    AfterValidator(_check_url),
    WithJsonSchema({"type": "string", "pattern": "^[hH][tT][tT][pP][sS]?://"}),
]
_HostPath = Annotated[
    StrictStr, AfterValidator(_check_not_empty), WithJsonSchema({"type": "string", "minLength": 1})
]
_SpecRelativePath = Annotated[
    StrictStr,
    AfterValidator(_check_spec_relative),
    WithJsonSchema({"type": "string", "minLength": 1, "pattern": "^[^/]"}),
]
_WorkspacePath = Annotated[
    StrictStr, AfterValidator(_check_input_path), WithJsonSchema({"type": "string", "minLength": 1})
]
_OutputPattern = Annotated[
    StrictStr, AfterValidator(_check_output), WithJsonSchema({"type": "string", "minLength": 1})
]


def _check_archive(value: str) -> str:
    _no_nul(value)
    if "/" in value or not value.endswith(".tar.gz") or value == ".tar.gz" or len(value) > 200:
        _fail(
            f"invalid archive name {_show(value)}: expected a file name ending in .tar.gz "
            "(it is written into the output directory)"
        )
    return value


_Archive = Annotated[
    StrictStr,
    AfterValidator(_check_archive),
    WithJsonSchema({"type": "string", "pattern": r"^[^/]+\.tar\.gz$"}),
]
_Run = Annotated[
    StrictStr, AfterValidator(_check_run), WithJsonSchema({"type": "string", "minLength": 1})
]


# --- the models -----------------------------------------------------------------------------


class LimitsSpec(BaseModel):
    """Resource limits of a build or of one step; ``None`` (or absent) means not set.

    Sizes and durations may be numbers (bytes, seconds) or strings with units, as in
    :mod:`buildcell.units`: ``memory: 2GiB``, ``timeout: 1h30m``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    memory: Annotated[int | None, WithJsonSchema(_SIZE_SCHEMA)] = Field(
        default=None, description="Memory limit: bytes or a size such as 512M or 2GiB."
    )
    pids: Annotated[int | None, WithJsonSchema(_PIDS_SCHEMA)] = Field(
        default=None, description="How many tasks the cell may have at once."
    )
    cpus: Annotated[float | None, WithJsonSchema(_CPUS_SCHEMA)] = Field(
        default=None, description="CPU share; fractions such as 0.5 are allowed."
    )
    disk: Annotated[int | None, WithJsonSchema(_SIZE_SCHEMA)] = Field(
        default=None, description="Bytes the cell may write: a size such as 4GiB."
    )
    timeout: Annotated[float | None, WithJsonSchema(_DURATION_SCHEMA)] = Field(
        default=None, description="Wall-clock limit: seconds or a duration such as 30m, 1h30m."
    )

    @field_validator("memory", "disk", mode="before")
    @classmethod
    def _parse_size(cls, value: object) -> int | None:
        return _to_size(value)

    @field_validator("pids", mode="before")
    @classmethod
    def _parse_pids(cls, value: object) -> int | None:
        return _to_pids(value)

    @field_validator("cpus", mode="before")
    @classmethod
    def _parse_cpus(cls, value: object) -> float | None:
        return _to_cpus(value)

    @field_validator("timeout", mode="before")
    @classmethod
    def _parse_timeout(cls, value: object) -> float | None:
        return _to_duration(value)

    def merged(self, override: LimitsSpec | None) -> LimitsSpec:
        """These limits, with every limit that ``override`` sets (is not ``None``) replaced."""
        if override is None:
            return self
        update = {
            name: value
            for name in type(self).model_fields
            if (value := getattr(override, name)) is not None
        }
        return self.model_copy(update=update)


_SECRET_NAME = r"[A-Za-z_][A-Za-z0-9_.-]{0,127}"  # noqa: S105 - a name pattern


def _check_secret_name(value: str) -> str:
    if re.fullmatch(_SECRET_NAME, value) is None:
        _fail(
            f"invalid secret name {_show(value)}: expected letters, digits, '_', '.' or '-', "
            "not starting with a digit"
        )
    return value


_SecretName = Annotated[
    StrictStr,
    AfterValidator(_check_secret_name),
    WithJsonSchema({"type": "string", "pattern": f"^{_SECRET_NAME}$"}),
]


class SecretUse(BaseModel):
    """A secret a step needs, by name. It is always a file ``/run/secrets/NAME``; ``env``
    also sets that environment variable (weaker: environments leak more easily). Where the
    value comes from is never in the spec: the operator binds it (``--secret``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: _SecretName = Field(description="The secret's name, bound with --secret NAME=...")
    env: _EnvName | None = Field(
        default=None, description="Also deliver it as this environment variable."
    )

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: object) -> object:
        return {"name": value} if isinstance(value, str) else value


def _check_allow(value: str) -> str:
    from buildcell.allowlist import parse_allow

    try:
        return parse_allow(value).describe()
    except ConfigError as e:
        _fail(e.message + (f" ({e.hint})" if e.hint else ""))


_AllowEntry = Annotated[
    StrictStr,
    AfterValidator(_check_allow),
    WithJsonSchema(
        {
            "type": "string",
            "description": "HOST (ports 80, 443), HOST:PORT, *.DOMAIN[:PORT] (subdomains "
            "only), or an IP/CIDR with a port (10.0.0.5:8080, [::1]:8080).",
        }
    ),
]


class NetworkSpec(BaseModel):
    """What a step may reach. Without it (or with an empty list) the step has no network."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    allow: list[_AllowEntry] = Field(
        default=[],
        description="Destinations reachable through the cell's egress proxy and resolver.",
    )


_CACHE_KEY = r"[a-z0-9][a-z0-9._-]{0,63}"


def _check_cache_key(value: str) -> str:
    if re.fullmatch(_CACHE_KEY, value) is None:
        _fail(
            f"invalid cache key {_show(value)}: expected lowercase letters, digits, '.', '_' "
            "or '-' (at most 64), starting with a letter or digit"
        )
    return value


def _check_cache_path(value: str) -> str:
    path = posixpath.normpath(value)
    if not value.startswith("/") or path != value.rstrip("/") or path == "/":
        _fail(f"invalid cache path {_show(value)}: expected an absolute, normalized path")
    # Not under /workspace: a cache there would hide sources, pinned inputs or outputs.
    if not (path.startswith(("/home/builder/", "/tmp/")) or path == "/tmp"):
        _fail(
            f"invalid cache path {_show(value)}: caches live under /home/builder or /tmp",
        )
    return path


class OutputSpec(BaseModel):
    """An output pattern with options: ``{path: "coverage/*", optional: true}``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: _OutputPattern = Field(description="A glob pattern, relative to /workspace.")
    optional: StrictBool = Field(
        default=False,
        description="The pattern may match nothing; by default a pattern that matches no file "
        "fails the build.",
    )


def _output_kind(value: object) -> str | None:
    if isinstance(value, str):
        return "pattern"
    if isinstance(value, OutputSpec | dict):
        return "entry"
    return None


_OUTPUT_EXPECTED = "expected a glob pattern or {path: PATTERN, optional: true}"

_Output = Annotated[
    Annotated[_OutputPattern, Tag("pattern")] | Annotated[OutputSpec, Tag("entry")],
    Discriminator(_output_kind, custom_error_type="output", custom_error_message=_OUTPUT_EXPECTED),
]


class CacheSpec(BaseModel):
    """A writable directory that survives between builds of the same project.

    It is keyed by project, ``key`` and trust level: a trusted build never sees what an
    untrusted one wrote."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: Annotated[StrictStr, AfterValidator(_check_cache_path)] = Field(
        description="Where the cache appears in the cell (under /home/builder or /tmp), e.g. "
        "/home/builder/.cache/pip."
    )
    key: Annotated[StrictStr, AfterValidator(_check_cache_key)] = Field(
        description="The cache's name within the project, e.g. pip."
    )


class StepSpec(BaseModel):
    """One step of a build: a shell command run in its own cell, in order."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: _Name = Field(description="Step name: lowercase letters, digits, '.', '_', '-'.")
    run: _Run = Field(description="Shell commands, run in /workspace.")
    env: _Env = Field(default={}, description="Variables added for this step only.")
    limits: LimitsSpec | None = Field(
        default=None, description="Limits for this step; they override the build's limits."
    )
    secrets: list[SecretUse] = Field(
        default=[],
        description="Secrets this step needs: names, or {name, env} mappings. Only this "
        "step's cell gets them.",
    )
    network: NetworkSpec | None = Field(
        default=None,
        description="Egress allowlist of this step; without it the step has no network.",
    )
    caches: list[CacheSpec] = Field(
        default=[],
        description="Writable caches kept between builds of this project, per trust level.",
    )

    @model_validator(mode="after")
    def _distinct_caches(self) -> StepSpec:
        for index, cache in enumerate(self.caches):
            for other in self.caches[:index]:
                if cache.key == other.key:
                    _fail(f"cache key {cache.key!r} is listed twice", at=("caches", index))
                if posixpath.commonpath([cache.path, other.path]) in (cache.path, other.path):
                    _fail(
                        f"cache path {cache.path!r} overlaps {other.path!r}: one would hide "
                        "the other",
                        at=("caches", index),
                    )
        return self

    @model_validator(mode="after")
    def _distinct_secrets(self) -> StepSpec:
        seen: dict[str, int] = {}
        for index, use in enumerate(self.secrets):
            first = seen.setdefault(use.name, index)
            if first != index:
                _fail(f"secret {use.name!r} is listed twice", at=("secrets", index))
        return self


class InputSpec(BaseModel):
    """A pinned input: fetched on the host, checked against ``sha256``, read-only inside.

    Exactly one of ``url`` (http or https) and ``file`` (a local file, relative to the
    spec's directory) is given. ``path`` is where it appears, relative to ``/workspace``;
    it is stored normalized (``./a//b`` becomes ``a/b``).
    """

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        json_schema_extra={"oneOf": [{"required": ["url"]}, {"required": ["file"]}]},
    )

    url: _Url | None = Field(default=None, description="An http:// or https:// URL.")
    file: _SpecRelativePath | None = Field(
        default=None,
        description="A local file inside the directory of buildcell.yaml, relative to it.",
    )
    sha256: _Sha256 = Field(description="SHA-256 of the content: 64 hexadecimal digits.")
    path: _WorkspacePath = Field(description="Where the input appears, relative to /workspace.")

    @model_validator(mode="after")
    def _one_source(self) -> InputSpec:
        if self.url is not None and self.file is not None:
            _fail("expected exactly one of url and file, got both")
        if self.url is None and self.file is None:
            _fail("expected exactly one of url and file, got neither")
        return self

    def uri(self, spec_dir: Path) -> str:
        """Where the input comes from: the URL, or a ``file://`` URI of the local file.

        A relative ``file`` is taken relative to ``spec_dir`` and made absolute (lexically,
        without following symlinks); the URI is percent-encoded as :meth:`Path.as_uri` does.
        """
        if self.url is not None:
            return self.url
        assert self.file is not None
        return Path(os.path.abspath(spec_dir / self.file)).as_uri()


class HostRootfsSpec(BaseModel):
    """The rootfs written ``host``: a minimal read-only view of the host system."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _from_word(cls, data: object) -> object:
        return {} if data == "host" else data

    @model_serializer
    def _to_word(self) -> str:
        return "host"

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"const": "host", "type": "string", "description": cls.__doc__}


class DirRootfsSpec(BaseModel):
    """A directory on the host used, read-only, as the root: ``{dir: PATH}``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dir: _HostPath = Field(
        description="The directory, relative to buildcell.yaml's directory (an absolute "
        "path only where the operator's configuration grants it)."
    )


class OciRootfsSpec(BaseModel):
    """An OCI image layout pinned by digest: ``{oci: PATH, digest: "sha256:..."}``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    oci: _HostPath = Field(description="The OCI image layout (directory or tar archive).")
    digest: _Digest = Field(description="The image manifest digest, sha256:<64 hex digits>.")


def _rootfs_kind(value: object) -> str | None:
    if isinstance(value, HostRootfsSpec) or value == "host":
        return "host"
    if isinstance(value, DirRootfsSpec):
        return "dir"
    if isinstance(value, OciRootfsSpec):
        return "oci"
    if isinstance(value, dict) and ("dir" in value) != ("oci" in value):
        return "dir" if "dir" in value else "oci"
    return None


_ROOTFS_EXPECTED = "expected 'host', {dir: PATH} or {oci: PATH, digest: \"sha256:...\"}"

RootfsSpec = Annotated[
    Annotated[HostRootfsSpec, Tag("host")]
    | Annotated[DirRootfsSpec, Tag("dir")]
    | Annotated[OciRootfsSpec, Tag("oci")],
    Discriminator(_rootfs_kind, custom_error_type="rootfs", custom_error_message=_ROOTFS_EXPECTED),
]


class BuildSpec(BaseModel):
    """A build: pinned inputs, then steps run one after another in fresh cells.

    Every step sees the same ``/workspace``; ``outputs`` are collected after the last step.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1] = Field(description="The spec format version; this buildcell reads 1.")
    name: _Name = Field(description="Build name: lowercase letters, digits, '.', '_', '-'.")
    rootfs: RootfsSpec = Field(
        default=HostRootfsSpec(),
        description="The cell's root file system: 'host', {dir: PATH} or {oci: PATH, digest}.",
    )
    env: _Env = Field(default={}, description="Variables added for every step.")
    inputs: list[InputSpec] = Field(default=[], description="Pinned inputs.")
    limits: LimitsSpec = Field(
        default=LimitsSpec(), description="Limits of every step, unless the step overrides them."
    )
    steps: list[StepSpec] = Field(min_length=1, description="The steps, run in order.")
    outputs: list[_Output] = Field(
        default=[],
        description="Glob patterns, relative to /workspace, collected at the end; each must "
        "match a file unless given as {path: PATTERN, optional: true}.",
    )
    source_date_epoch: Annotated[StrictInt, Field(ge=0)] | None = Field(
        default=None,
        description="SOURCE_DATE_EPOCH inside the cells (seconds since 1970); default: the "
        "source's last commit time, else 0.",
    )
    archive: _Archive | None = Field(
        default=None,
        description="Also pack every collected output into this reproducible .tar.gz (sorted "
        "entries, mtimes set to SOURCE_DATE_EPOCH, uid/gid 0, no gzip timestamp).",
    )

    @field_validator("version", mode="before")
    @classmethod
    def _known_version(cls, value: object) -> object:
        if isinstance(value, int) and not isinstance(value, bool):
            if value != SPEC_VERSION:
                _fail(f"unsupported version {value}; this buildcell reads version {SPEC_VERSION}")
            return value
        _fail(f"invalid version {_show(value)}: expected {SPEC_VERSION}")

    @model_validator(mode="after")
    def _distinct(self) -> BuildSpec:
        seen: dict[str, int] = {}
        for index, step in enumerate(self.steps):
            first = seen.setdefault(step.name, index)
            if first != index:
                _fail(
                    f"duplicate step name {step.name!r} (also steps[{first}])",
                    at=("steps", index, "name"),
                )
        # Input paths may not repeat or contain one another: /workspace/a and /workspace/a/b
        # cannot both be files.
        paths: dict[str, int] = {}
        prefixes: dict[str, int] = {}  # every proper ancestor of a path seen so far
        for index, item in enumerate(self.inputs):
            if item.path in paths:
                _fail(
                    f"duplicate input path {item.path!r} (also inputs[{paths[item.path]}])",
                    at=("inputs", index, "path"),
                )
            parts = item.path.split("/")
            ancestors = ["/".join(parts[:n]) for n in range(1, len(parts))]
            other = next((paths[a] for a in ancestors if a in paths), prefixes.get(item.path))
            if other is not None:
                _fail(
                    f"input path {item.path!r} and inputs[{other}].path are nested in each "
                    "other; an input is a file and cannot contain another",
                    at=("inputs", index, "path"),
                )
            paths[item.path] = index
            for ancestor in ancestors:
                prefixes.setdefault(ancestor, index)
        return self

    @property
    def output_patterns(self) -> list[str]:
        """Every output pattern, optional or not."""
        return [o if isinstance(o, str) else o.path for o in self.outputs]

    @property
    def optional_outputs(self) -> frozenset[str]:
        """The patterns that may match nothing."""
        return frozenset(o.path for o in self.outputs if not isinstance(o, str) and o.optional)

    def step_limits(self, step: StepSpec) -> LimitsSpec:
        """The limits ``step`` runs with: the build's, overridden by the step's own."""
        return self.limits.merged(step.limits)


@dataclass(frozen=True)
class LoadedSpec:
    """A validated spec with the exact text it came from.

    Attributes:
        spec: the validated spec.
        path: the file it was read from, as given.
        text: the file's text.
        digest: ``sha256:`` and the hex SHA-256 of the file's exact bytes.
    """

    spec: BuildSpec
    path: Path
    text: str
    digest: str


# --- reading --------------------------------------------------------------------------------


def load_spec(path: Path) -> LoadedSpec:
    """Read and validate the spec at ``path``.

    Raises:
        SpecError: the file cannot be read, is larger than 1 MiB, is not UTF-8, or is not a
            valid spec; the message names the file, the line and the field.
    """
    data = _read_spec_file(path)
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(_TOO_LARGE.format(source=path))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise SpecError(f"{path}:{line}: not UTF-8 text: byte {data[e.start]:#04x}") from e
    return _parse(text, data, path)


def _read_spec_file(path: Path) -> bytes:
    """At most one byte more than a spec may hold, from a regular file ``path`` names.

    The file itself is opened without following a symlink and without blocking: in a
    checkout it is the repository's, and a link to a host file, a fifo or a device would
    otherwise be read (or waited on) as the invoking user. Its directory is the operator's
    (the CLI refuses symlinks below the working directory before this).
    """
    try:
        os.lstat(path)
        root = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise SpecError(f"cannot read {show(str(path))}: {e.strerror or e}") from e
    try:
        fd, _ = confined.open_file(root, path.name, what="the spec")
    except confined.UnsafePathError as e:
        raise SpecError(f"cannot read {show(str(path))}: {e.message}") from e
    finally:
        os.close(root)
    try:
        with os.fdopen(fd, "rb") as f:
            return f.read(MAX_SPEC_BYTES + 1)
    except OSError as e:
        raise SpecError(f"cannot read {show(str(path))}: {e.strerror or e}") from e


def parse_spec(text: str, *, path: Path) -> LoadedSpec:
    """Validate the spec ``text``; ``path`` names it in errors and in the result.

    The digest is that of ``text`` encoded as UTF-8.

    Raises:
        SpecError: the text is not a valid spec; the message names the file, the line and
            the field.
    """
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise SpecError(f"{path}: not valid Unicode text (character {e.start})") from e
    return _parse(text, data, path)


def spec_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of ``buildcell.yaml``, for editors and ``buildcell schema``.

    The schema describes the shape of a spec; a few checks (unique step names, input paths
    that do not nest) are made only by :func:`load_spec`.
    """
    schema = BuildSpec.model_json_schema()
    schema.pop("title", None)
    schema.pop("description", None)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "buildcell.yaml",
        "description": f"A buildcell build spec, version {SPEC_VERSION}.",
        **schema,
    }


_TOO_LARGE = "{source}: the spec is larger than 1 MiB"
#: A spec with more errors than this reports this many, the last line counting the rest.
MAX_REPORTED_ERRORS = 100


def _parse(text: str, data: bytes, path: Path) -> LoadedSpec:
    source = str(path)
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(_TOO_LARGE.format(source=source))
    document = read_yaml(
        text,
        functools.partial(_yaml_problem, source),
        merge_keys=True,
        document="a spec",
        max_nodes=MAX_NODES,
        max_depth=MAX_DEPTH,
    )
    if document.data is None:
        raise SpecError(f"{source}:1: empty spec: expected a mapping with version, name and steps")
    if not isinstance(document.data, dict):
        raise SpecError(
            _message(
                source,
                document.site(()).line,
                (),
                f"expected a mapping with version, name and steps, got {_kind(document.data)}",
            )
        )
    try:
        spec = BuildSpec.model_validate(document.data)
    except ValidationError as e:
        raise _spec_error(source, document, e) from e
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    return LoadedSpec(spec=spec, path=path, text=text, digest=digest)


def _yaml_problem(source: str, problem: YamlProblem) -> SpecError:
    return SpecError(_message(source, problem.line, problem.loc, problem.message))


def _message(source: str, line: int | None, loc: _Loc, problem: str) -> str:
    where = source if line is None else f"{source}:{line}"
    field = field_path(loc)
    text = f"{where}: {field}: {problem}" if field else f"{where}: {problem}"
    return " ".join(text.splitlines())  # one line, whatever a file name or message holds


# --- validation errors, mapped back to lines ------------------------------------------------


def _spec_error(source: str, document: Document, error: ValidationError) -> SpecError:
    """A :class:`SpecError` for every one of pydantic's errors, in file order.

    The first is the error's message; the others, one line each in the same form, are its
    ``details``.
    """
    errors = error.errors(include_url=False)
    # A misspelt key makes two errors: "unknown field 'nmae'" and "'name' is missing".
    # The first says it all; the second is dropped.
    misspelt = {
        (_user_loc(tuple(e["loc"][:-1])), suggestion)
        for e in errors
        if e["type"] == "extra_forbidden" and (suggestion := _suggest(tuple(e["loc"]))) is not None
    }
    located = sorted(
        _locate(source, document, details)
        for details in errors
        if details["type"] != "missing"
        or (_user_loc(tuple(details["loc"][:-1])), details["loc"][-1]) not in misspelt
    )
    lines = list(dict.fromkeys(message for _, message in located))
    if len(lines) > MAX_REPORTED_ERRORS:
        rest = len(lines) - MAX_REPORTED_ERRORS + 1
        lines = [*lines[: MAX_REPORTED_ERRORS - 1], f"{source}: and {rest} more errors"]
    return SpecError(lines[0], details=lines[1:])


def _locate(
    source: str, document: Document, details: ErrorDetails
) -> tuple[tuple[int, int, bool], str]:
    """Where an error is (line, column; a missing field after others there) and its text."""
    raw = tuple(details["loc"])
    on_key = raw[-1:] == ("[key]",)
    loc = _user_loc(raw)
    kind = details["type"]
    ctx: dict[str, Any] = dict(details.get("ctx") or {})
    value = details["input"]
    if kind == "buildcell":
        loc = (*loc, *ctx.get("at", ()))
        at = _at(document.site(loc), on_key=on_key)
        problem = str(ctx["message"])
    elif kind == "missing":
        at = _at(document.site(loc[:-1]), on_key=False)
        problem = "required field is missing"
        if loc == ("version",):
            problem += f"; add 'version: {SPEC_VERSION}'"
    elif kind == "extra_forbidden":
        at = _at(document.site(loc), on_key=True)
        problem = _unknown_field(raw)
    else:
        site = document.site(loc)
        at = _at(site, on_key=on_key)
        problem = _describe(details, loc, value, site if loc in document.sites else None)
    return (*at, kind == "missing"), _message(source, at[0], loc, problem)


def _at(site: Site, *, on_key: bool) -> tuple[int, int]:
    return (site.key_line, site.key_column) if on_key else (site.line, site.column)


def _user_loc(raw: tuple[str | int, ...]) -> _Loc:
    """Pydantic's ``loc`` as the user wrote the data: without the union tags (the second
    element of ``("rootfs", "oci", "digest")``, the third of ``("outputs", 0, "entry",
    "path")``) and without ``[key]`` markers."""
    loc = [part for part in raw if part != "[key]"]
    if len(loc) > 1 and loc[0] == "rootfs":
        del loc[1]
    if len(loc) > 2 and loc[0] == "outputs" and loc[2] in ("pattern", "entry"):
        del loc[2]
    return tuple(loc)


_SHAPES = {
    "StepSpec": "{name: NAME, run: COMMAND}",
    "InputSpec": "{url: URL, sha256: HEX, path: PATH}",
    "LimitsSpec": "{memory: 2GiB, timeout: 30m}",
}


def _describe(details: ErrorDetails, loc: _Loc, value: object, site: Site | None) -> str:
    """A user's description of one of pydantic's own errors."""
    kind = details["type"]
    ctx: dict[str, Any] = dict(details.get("ctx") or {})
    got = _kind(value)
    if kind == "string_type":
        if site is not None and site.plain and site.text and isinstance(value, bool | int | float):
            return f'expected a string, got {got}; write "{site.text}" in quotes'
        return f"expected a string, got {got}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"expected a whole number, got {got}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        shape = _SHAPES.get(str(ctx.get("class_name")))
        return f"expected a mapping{f' such as {shape}' if shape else ''}, got {got}"
    if kind == "list_type":
        return f"expected a list, got {got}"
    if kind == "too_short":
        if loc == ("steps",):
            return "expected at least one step"
        return f"expected at least {ctx.get('min_length')} items"
    if kind == "greater_than_equal":
        return f"expected {ctx.get('ge')} or more, got {_show(value)}"
    message = details["msg"]
    return message[:1].lower() + message[1:]


def _unknown_field(raw: tuple[str | int, ...]) -> str:
    suggestion = _suggest(raw)
    if suggestion is not None:
        return f"unknown field (did you mean {suggestion!r}?)"
    known = _fields_at(raw[:-1])
    if known:
        return f"unknown field; expected one of {', '.join(known)}"
    return "unknown field"


def _suggest(raw: tuple[str | int, ...]) -> str | None:
    """The known field closest to the unknown one that pydantic's ``raw`` loc ends in."""
    name = raw[-1]
    if not isinstance(name, str):
        return None
    close = difflib.get_close_matches(name, _fields_at(raw[:-1]), n=1)
    return close[0] if close else None


def _fields_at(raw: tuple[str | int, ...]) -> list[str]:
    """The field names of the model that pydantic's ``raw`` loc points into."""
    annotation: Any = BuildSpec
    for part in raw:
        annotation = _descend(annotation, part)
        if annotation is None:
            return []
    annotation = _strip(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return list(annotation.model_fields)
    return []


def _strip(annotation: Any) -> Any:
    """``annotation`` without ``Annotated[...]`` and without ``| None``."""
    while True:
        if get_origin(annotation) is Annotated:
            annotation = get_args(annotation)[0]
            continue
        if get_origin(annotation) in (typing.Union, types.UnionType):
            members = [m for m in get_args(annotation) if m is not type(None)]
            if len(members) == 1:
                annotation = members[0]
                continue
        return annotation


def _descend(annotation: Any, part: str | int) -> Any:
    annotation = _strip(annotation)
    origin = get_origin(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        field = annotation.model_fields.get(str(part))
        return None if field is None else field.annotation
    if origin is list and isinstance(part, int):
        return get_args(annotation)[0]
    if origin is dict and isinstance(part, str):
        return get_args(annotation)[1]
    if origin in (typing.Union, types.UnionType):
        # A tagged union (rootfs): pydantic's loc names the member by its tag.
        for member in get_args(annotation):
            tags = [a.tag for a in get_args(member)[1:] if isinstance(a, Tag)]
            if part in tags:
                return member
    return None
