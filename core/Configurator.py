"""Reading experiment YAML files and building objects from ``{module_name, class_name, params}`` blocks.

Everything that can be built from YAML goes through :func:`build`, the one strict builder: it requires
``module_name`` and ``class_name``, accepts an optional ``params`` mapping (``None`` means ``{}``) and an
optional ``enabled`` flag, rejects every other key, checks that the class is a subclass of what the slot
expects, binds ``params`` to the constructor's signature and checks their types *before* constructing.
Every failure is a :class:`ConfigError` that names the YAML path and, where it helps, the valid choices.
A parameter annotated with a dataclass (a typed sub-block such as a diffusion model's
``inference: {sampler: strided, noise_level: 250, steps: 25}``) takes a mapping that is checked key by key at its
nested path (``model.params.inference.sampler``) and converted to the dataclass. A constructor that takes
``**kwargs`` and derives from a class with named constructor parameters forwards them there
(``super().__init__(**kwargs)``, e.g. AutoDDPM's DDPM options): those keys are checked against the base's signature.
A class may keep short-form keys valid beside its typed sub-blocks by declaring a static ``config_aliases(params,
path)`` that nests them (the trainer's flat ``ema_decay: 0.999`` = ``ema: {decay: 0.999}``; :func:`aliased_params`).

Loading (:func:`load_config`) uses a safe YAML loader that also accepts ``!!python/tuple``, refuses a key
written twice in one mapping (file and line), reads ``1e-3`` as a float (YAML 1.2), composes
``_base_`` files (paths relative to the including file, merged in order, the including file last) and
applies ``--set a.b.c=value`` overrides. The loaded config is a fresh nested ``dict``; builders never
mutate it (they work on deep copies).

Imports are limited (:func:`import_problem`): a block's ``module_name`` must lie inside the project's own
packages (:data:`PROJECT_PACKAGES`), be one of the few libraries the shipped configs build from
(:data:`LIBRARY_MODULES`) or be listed by the config's own ``allow_imports:`` (:func:`allow_imports`); anything
else is refused before it is imported, since importing a module runs its code. A config read from a checkpoint
gets no allow-list of its own.

Every YAML document (a file or a ``--set`` value) is bounded before it is built: at most
:data:`MAX_DOCUMENT_BYTES` bytes, :data:`MAX_DOCUMENT_VALUES` values once every alias is expanded (an "alias
bomb", anchors that repeat anchors, would otherwise expand to billions of values and hang every later copy
or comparison) and :data:`MAX_DOCUMENT_DEPTH` levels of nesting. The check reads the parser's event stream
once and never composes or expands anything; it costs about one more parse of the document (4 ms for the
largest shipped file, ``_base/real_data.yaml``, against 5 ms for its load, one thread, load average 1.3).
"""

from __future__ import annotations

import collections.abc as cabc
import copy
import dataclasses
import difflib
import importlib
import importlib.util
import inspect
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

BLOCK_KEYS = ("module_name", "class_name", "params", "enabled")
MERGE_MARKERS = ("<<<<<<<", "=======", ">>>>>>>", "|||||||")
# The repository's top-level packages: a config may import any module inside them.
PROJECT_PACKAGES = ("core", "data", "dl_utils", "model_zoo", "optim", "projects", "tests", "tools")
# Earlier module names that YAML files may still use, and the module each now means (a rename never breaks a config).
MODULE_ALIASES = {"core.DataLoader": "core.data_module", "core.DownstreamEvaluator": "core.evaluation"}
# Modules outside the project that the shipped configs build from (exactly these, not their submodules).
LIBRARY_MODULES = ("torch.optim", "torch.optim.lr_scheduler")
REPO_ROOT = Path(__file__).resolve().parents[1]
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_allowed_by_config: tuple[str, ...] = ()  # the running config's allow_imports (set by allow_imports())
# Bounds of one YAML document; the shipped configs are below 6 kB, 250 values and 6 levels.
MAX_DOCUMENT_BYTES = 1 << 20
MAX_DOCUMENT_VALUES = 100_000
MAX_DOCUMENT_DEPTH = 64


class ConfigError(Exception):
    """A configuration problem; the message names the file and/or YAML path at fault."""


class ParamError(ValueError):
    """A constructor's complaint about the value of one of its parameters.

    :func:`build` reports it at that parameter's YAML path (``trainer.params.max_epochs: must be > 0, got 0``);
    elsewhere it reads as a plain ``ValueError``: ``message``, by default ``max_epochs must be > 0, got 0``.
    """

    def __init__(self, param: str, problem: str, message: str | None = None) -> None:
        super().__init__(message or f"{param} {problem}")
        self.param, self.problem = param, problem


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping holds the same key twice (PyYAML would silently keep the last value)."""


class _SafeTupleLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` for configs: reads ``!!python/tuple``, refuses duplicate keys, and reads scientific
    notation without a dot (``1e-3``, ``5E4``) as a float, as YAML 1.2 does (YAML 1.1 reads it as a string)."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, cabc.Hashable):
                    continue  # the base class raises its own error for an unhashable key
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise DuplicateKeyError(None, None, f"duplicate key {key!r} at line {line} (first at line "
                                            f"{seen[key]}): a YAML mapping may hold each key once", key_node.start_mark)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _construct_tuple(loader: yaml.SafeLoader, node: yaml.Node) -> tuple:
    return tuple(loader.construct_sequence(node, deep=True))


_SafeTupleLoader.add_constructor("tag:yaml.org,2002:python/tuple", _construct_tuple)
# YAML 1.1's float pattern needs a dot ("1.0e-3"); "1e-3" would stay a string and fail far from the YAML.
_SCIENTIFIC_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
_SafeTupleLoader.add_implicit_resolver("tag:yaml.org,2002:float", _SCIENTIFIC_FLOAT, list("-+0123456789"))


# --------------------------------------------------------------------------------------------- loading
def check_document_bounds(text: str, where: str) -> None:
    """Refuse a YAML document that is too large, too deeply nested or expands too far through its aliases.

    Reads the parser's events once (nothing is composed or expanded): each scalar, collection and alias counts
    as the number of values it stands for, an alias as the size of what its anchor marks.

    Args:
        text: the YAML document; where: names it in the message (file path or ``--set ...``).

    Raises:
        ConfigError: naming ``where`` (and the line) and the bound exceeded.
    """
    if len(text.encode("utf-8")) > MAX_DOCUMENT_BYTES:
        raise ConfigError(f"{where}: {len(text.encode('utf-8'))} bytes, more than a config may hold "
                          f"({MAX_DOCUMENT_BYTES} bytes)")
    sizes: dict[str, int] = {}  # anchor -> number of values it stands for
    open_at: list[tuple[str | None, int]] = []  # (anchor, values counted before it) of each open collection
    total = 0
    try:
        for event in yaml.parse(text, Loader=_SafeTupleLoader):
            if isinstance(event, yaml.CollectionEndEvent):
                anchor, before = open_at.pop()
                if anchor is not None:
                    sizes[anchor] = total - before
                continue
            if isinstance(event, yaml.AliasEvent):
                total += sizes.get(event.anchor, 1)  # an unknown anchor: the loader reports it
            elif isinstance(event, yaml.ScalarEvent | yaml.CollectionStartEvent):
                if isinstance(event, yaml.CollectionStartEvent):
                    open_at.append((event.anchor, total))
                    if len(open_at) > MAX_DOCUMENT_DEPTH:
                        raise ConfigError(f"{where}:{event.start_mark.line + 1}: nested more than "
                                          f"{MAX_DOCUMENT_DEPTH} levels deep")
                elif event.anchor is not None:
                    sizes[event.anchor] = 1
                total += 1
            else:
                continue
            if total > MAX_DOCUMENT_VALUES:
                alias = f" (YAML alias *{event.anchor} repeats what its anchor marks)" if isinstance(
                    event, yaml.AliasEvent) else ""
                raise ConfigError(f"{where}:{event.start_mark.line + 1}: the document expands to more than "
                                  f"{MAX_DOCUMENT_VALUES} values{alias}; a config is far smaller")
    except yaml.YAMLError:
        return  # malformed YAML: the loader raises the error with its position


def check_value_bounds(value: Any, where: str) -> None:
    """The bounds of :func:`check_document_bounds` for a config that did not come from YAML (a checkpoint's).

    Shared sub-objects count once per place they appear (as an alias does), and the walk stops at the bound.

    Raises:
        ConfigError: naming ``where`` and the bound exceeded.
    """
    stack: list[tuple[Any, int]] = [(value, 1)]
    count = 0
    while stack:
        item, depth = stack.pop()
        count += 1
        if count > MAX_DOCUMENT_VALUES:
            raise ConfigError(f"{where}: expands to more than {MAX_DOCUMENT_VALUES} values; a config is far smaller")
        if depth > MAX_DOCUMENT_DEPTH:
            raise ConfigError(f"{where}: nested more than {MAX_DOCUMENT_DEPTH} levels deep")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for pair in item.items() for v in pair)
        elif isinstance(item, list | tuple):
            stack.extend((v, depth + 1) for v in item)


def _load_bounded(text: str, where: str) -> Any:
    check_document_bounds(text, where)
    return yaml.load(text, Loader=_SafeTupleLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read one YAML file (no composition) into a dict.

    Refuses merge-conflict markers, duplicate keys (naming the file and line) and documents beyond the bounds of
    :func:`check_document_bounds`; ``1e-3`` is a float.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.stat().st_size > MAX_DOCUMENT_BYTES:  # before reading it into memory
        raise ConfigError(f"{path}: {path.stat().st_size} bytes, more than a config may hold "
                          f"({MAX_DOCUMENT_BYTES} bytes)")
    text = path.read_text(encoding="utf-8")
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.startswith(MERGE_MARKERS):
            raise ConfigError(
                f"{path}:{lineno}: merge-conflict marker {line[:7]!r}; resolve the conflict before running"
            )
    try:
        data = _load_bounded(text, str(path))
    except DuplicateKeyError as err:
        raise ConfigError(f"{path}:{err.problem_mark.line + 1}: {err.problem}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from err
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``override`` into a copy of ``base``; mappings merge, anything else replaces.

    A mapping holding ``_delete_: true`` replaces the base's mapping instead of merging into it (e.g. a real-data
    ``data:`` block replacing the embedded one, so no embedded test set survives the composition).
    """
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and value.get("_delete_") is True:
            out[key] = copy.deepcopy(value)  # the marker stays until load_config strips it: later merges need it
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _compose(path: Path, stack: tuple[Path, ...]) -> dict[str, Any]:
    path = path.resolve()
    if path in stack:
        chain = " -> ".join(str(p) for p in (*stack, path))
        raise ConfigError(f"circular _base_ include: {chain}")
    data = read_yaml(path)
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: _base_ must be a path or a list of paths, got {bases!r}")
    merged: dict[str, Any] = {}
    for base in bases:
        base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
        if not base_path.is_file():
            raise ConfigError(f"{path}: _base_ file not found: {base} (looked at {base_path})")
        merged = merge(merged, _compose(base_path, (*stack, path)))
    return merge(merged, data)


def _strip_delete_markers(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_delete_markers(v) for k, v in value.items() if k != "_delete_"}
    if isinstance(value, list):
        return [_strip_delete_markers(v) for v in value]
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into a key path and a YAML-scalar-parsed value."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY.PATH=VALUE")
    key, raw = text.split("=", 1)
    keys = key.strip().split(".")
    if not all(keys):
        raise ConfigError(f"--set {text!r}: empty key in {key!r}")
    try:
        value = _load_bounded(raw, f"--set {key.strip()}") if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text!r}: value is not valid YAML: {err}") from err
    return keys, value


def apply_overrides(config: dict[str, Any], overrides: cabc.Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``config`` with each ``a.b.c=value`` applied; intermediate keys must be mappings."""
    out = copy.deepcopy(config)
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                where = ".".join(keys[: depth + 1])
                raise ConfigError(f"--set {text!r}: {where} is a {type(child).__name__}, not a mapping")
            node = child
        node[keys[-1]] = value
    return out


def load_config(path: str | Path, overrides: cabc.Sequence[str] = ()) -> dict[str, Any]:
    """Load ``path`` with ``_base_`` composition and ``--set`` overrides; the result is a fresh dict."""
    config = _strip_delete_markers(_compose(Path(path), ()))
    config = apply_overrides(config, overrides)
    if overrides:
        config["overrides"] = list(overrides)
    return config


def get_path(config: dict[str, Any], dotted: str, default: Any = None) -> Any:
    """Read ``a.b.c`` from a nested mapping, returning ``default`` where a key is absent."""
    node: Any = config
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


def check_keys(section: Any, allowed: cabc.Iterable[str], path: str, *, required: cabc.Iterable[str] = ()) -> dict:
    """Check a plain mapping section: must be a dict, no unknown keys, required keys present."""
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: expected a mapping, got {type(section).__name__} ({section!r})")
    allowed = list(allowed)
    for key in section:
        if key not in allowed:
            raise ConfigError(f"{path}.{key}: unknown key{suggest(key, allowed)}; valid keys: {', '.join(allowed)}")
    for key in required:
        if key not in section:
            raise ConfigError(f"{path}.{key}: required key is missing")
    return section


# --------------------------------------------------------------------------------------------- building
def suggest(name: str, choices: cabc.Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the choice closest to ``name``, or ``""`` when none is close."""
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def is_enabled(block: Any) -> bool:
    """``enabled: false`` switches a block off; absent means on."""
    return not (isinstance(block, dict) and block.get("enabled", True) is False)


def allow_imports(entries: Any, path: str = "allow_imports") -> tuple[str, ...]:
    """Make ``entries`` (the config's ``allow_imports:`` list; None = none) importable besides the project.

    Each entry allows that module and every module below it (``my_lab.models`` allows
    ``my_lab.models.unet``). The list replaces the previous one: a command sets it once from the config the user
    gave, never from a config stored in a checkpoint.

    Returns:
        The allowed entries.

    Raises:
        ConfigError: naming ``path`` when ``entries`` is not a list of dotted module names.
    """
    global _allowed_by_config
    if entries is None:
        entries = []
    if not isinstance(entries, list) or not all(isinstance(e, str) and _MODULE_NAME.match(e) for e in entries):
        raise ConfigError(f"{path}: expected a list of module names (e.g. [my_lab.models]), got {entries!r}")
    _allowed_by_config = tuple(entries)
    return _allowed_by_config


def _within(module_name: str, package: str) -> bool:
    return module_name == package or module_name.startswith(package + ".")


def import_problem(module_name: str) -> str | None:
    """Why a config may not import ``module_name`` (a sentence), or None if it may. Imports nothing.

    Allowed: modules inside :data:`PROJECT_PACKAGES` (whose top-level package must be this repository's),
    exactly the modules of :data:`LIBRARY_MODULES`, and modules inside the entries given to :func:`allow_imports`.
    """
    if not _MODULE_NAME.match(module_name):
        return f"{module_name!r} is not a module name"
    if module_name in LIBRARY_MODULES or any(_within(module_name, e) for e in _allowed_by_config):
        return None
    top = module_name.split(".")[0]
    if top in PROJECT_PACKAGES:
        spec = importlib.util.find_spec(top)  # a top-level name: locating it imports nothing
        origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
        if origin is not None and origin.is_relative_to(REPO_ROOT):
            return None
        return f"{top!r} is not this repository's package (found at {origin})"
    allowed = ", ".join((*PROJECT_PACKAGES, *LIBRARY_MODULES, *_allowed_by_config))
    return (f"{module_name!r} is outside this project, and importing a module runs its code: a config may import "
            f"only from {allowed} (add a package of your own to the config's allow_imports list)")


def check_imports(value: Any, path: str) -> None:
    """Check every ``module_name`` of the blocks inside ``value`` (a config or a part of it) without importing.

    Raises:
        ConfigError: naming the block's YAML path below ``path`` (``model.params.network.module_name``).
    """
    if isinstance(value, dict):
        name = value.get("module_name")
        if isinstance(name, str) and "class_name" in value:
            problem = import_problem(name)
            if problem:
                raise ConfigError(f"{path}.module_name: {problem}")
        for key, item in value.items():
            check_imports(item, f"{path}.{key}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            check_imports(item, f"{path}[{i}]")


def resolve_class(block: Any, path: str, base: type | None = None) -> type:
    """Validate a block's shape and import its class (without constructing it)."""
    if not isinstance(block, dict):
        raise ConfigError(f"{path}: expected a {{module_name, class_name, params}} block, got {block!r}")
    for key in block:
        if key not in BLOCK_KEYS:
            raise ConfigError(
                f"{path}.{key}: unknown key{suggest(key, BLOCK_KEYS)}; valid keys: {', '.join(BLOCK_KEYS)}"
            )
    for key in ("module_name", "class_name"):
        if not isinstance(block.get(key), str) or not block[key]:
            raise ConfigError(f"{path}.{key}: required, must be a non-empty string")
    if not isinstance(block.get("enabled", True), bool):
        raise ConfigError(f"{path}.enabled: must be true or false, got {block['enabled']!r}")
    module_name, class_name = MODULE_ALIASES.get(block["module_name"], block["module_name"]), block["class_name"]
    problem = import_problem(module_name)
    if problem:
        raise ConfigError(f"{path}.module_name: {problem}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
            raise ConfigError(f"{path}.module_name: no module named {module_name!r}") from err
        raise ConfigError(f"{path}.module_name: importing {module_name!r} failed: {err}") from err
    cls = getattr(module, class_name, None)
    if not inspect.isclass(cls):
        choices = sorted(
            n for n, obj in vars(module).items()
            if inspect.isclass(obj) and not n.startswith("_")
            and (obj.__module__ == module.__name__ or n in getattr(module, "__all__", ()))
            and (base is None or issubclass(obj, base))
        )
        raise ConfigError(
            f"{path}.class_name: {module_name} has no class {class_name!r}{suggest(class_name, choices)}; "
            f"available: {', '.join(choices) or '(none)'}"
        )
    if base is not None and not issubclass(cls, base):
        raise ConfigError(f"{path}.class_name: {module_name}.{class_name} is not a subclass of {base.__name__}")
    return cls


def build(block: Any, path: str, base: type | None = None, **injected: Any) -> Any:
    """Build the object a YAML block describes.

    Args:
        block: ``{module_name, class_name, params, enabled}`` mapping from the config (not mutated).
        path: its YAML path, used in every error message (e.g. ``trainer.params.optimizer``).
        base: the class the slot expects; the built class must be a subclass.
        **injected: runtime objects passed to the constructor besides ``params`` (model, data, ...);
            a YAML param of the same name is an error.

    A mapping given for a parameter annotated with a dataclass (e.g. ``inference: InferenceSetting``) is checked
    key by key and converted to that dataclass (see :func:`to_dataclass`).

    Raises:
        ConfigError: naming ``path`` for any shape, import, class, binding, type or constructor error.
    """
    cls = resolve_class(block, path, base)
    params = copy.deepcopy(block.get("params")) or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{path}.params: expected a mapping, got {type(params).__name__}")
    for key in params:
        if key in injected:
            raise ConfigError(f"{path}.params.{key}: set by the framework, not from YAML")
    params, moved = aliased_params(cls, params, f"{path}.params")
    try:
        check_params(cls, params, f"{path}.params", injected=injected)
        hints = _signature(cls).hints
        params = {k: _convert(v, hints.get(k, Any), f"{path}.params.{k}") for k, v in params.items()}
        try:
            return cls(**params, **injected)
        except ParamError as err:
            raise ConfigError(f"{path}.params.{err.param}: {err.problem}") from err
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{path}: {block['module_name']}.{block['class_name']}: {err}") from err
    except ConfigError as err:
        renamed = named_as_written(err, moved)
        if renamed is err:
            raise
        raise renamed from err


def aliased_params(cls: Any, params: dict[str, Any], path: str) -> tuple[dict[str, Any], dict[str, str]]:
    """``params`` with the class's short-form keys moved into their typed sub-blocks (a new dict), and
    ``{nested YAML path: short-form YAML path}`` of the moved keys (for :func:`named_as_written`).

    A class declares them as ``config_aliases(params, path) -> (params, moved)`` (a static method; e.g. the
    trainer's flat ``ema_decay`` for ``ema: {decay: ...}``); other classes get ``params`` back unchanged.

    Raises:
        ConfigError: an option given in both forms, naming both YAML paths.
    """
    nest = getattr(cls, "config_aliases", None)
    if nest is None:
        return params, {}
    try:
        return nest(params, path)
    except ValueError as err:
        raise ConfigError(str(err)) from err


def named_as_written(err: ConfigError, moved: cabc.Mapping[str, str]) -> ConfigError:
    """``err`` with a nested YAML path that came from a short-form key named as the user wrote it."""
    message = str(err)
    for nested, short in moved.items():
        if message.startswith(f"{nested}:"):
            return ConfigError(f"{short}{message[len(nested):]}")
    return err


class _Signature(typing.NamedTuple):
    names: list[str]  # keyword-bindable parameter names
    required: list[str]  # names without a default
    hints: dict[str, Any]  # resolved annotations (empty where they cannot be resolved)
    open_kwargs: bool  # ``**kwargs`` that accept any key


def _signature(cls: Any) -> _Signature:
    """The constructor's (or function's) parameters.

    A class whose ``__init__`` takes ``**kwargs`` is taken to forward them to its base class's constructor
    (``super().__init__(**kwargs)``, e.g. AutoDDPM's DDPM options): the base's parameters are added, and only a base
    without named parameters (``object``, ``nn.Module``) leaves the keyword arguments open.
    """
    target = cls.__init__ if inspect.isclass(cls) else cls
    parameters = [p for p in inspect.signature(target).parameters.values() if p.name != "self"]
    named = [p for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    try:
        hints = {k: v for k, v in typing.get_type_hints(target).items() if k != "return"}
    except (NameError, TypeError):  # unresolvable forward references: skip type checks, binding is still checked
        hints = {}
    out = _Signature([p.name for p in named], [p.name for p in named if p.default is p.empty], hints,
                     any(p.kind is p.VAR_KEYWORD for p in parameters))
    if out.open_kwargs and inspect.isclass(cls):
        parent = next((c for c in cls.__mro__[1:] if "__init__" in vars(c)), object)
        if parent is not object:
            inherited = _signature(parent)
            if inherited.names:
                extra = [n for n in inherited.names if n not in out.names]
                return _Signature(out.names + extra, out.required + [n for n in inherited.required if n in extra],
                                  {**{k: v for k, v in inherited.hints.items() if k in extra}, **hints},
                                  inherited.open_kwargs)
    return out


def check_params(cls: Any, params: dict[str, Any], path: str, *, injected: cabc.Mapping[str, Any] = ()) -> None:
    """Check that ``params`` bind to ``cls``'s signature and match its annotations (dataclass blocks key by key)."""
    sig = _signature(cls)
    user_names = [n for n in sig.names if n not in injected]
    if not sig.open_kwargs:
        for key in params:
            if key not in sig.names:
                raise ConfigError(
                    f"{path}.{key}: unknown parameter{suggest(key, user_names)}; "
                    f"valid parameters: {', '.join(user_names) or '(none)'}"
                )
    for name in sig.required:
        if name not in params and name not in injected:
            raise ConfigError(f"{path}.{name}: required parameter is missing")
    for key, value in params.items():
        if key in sig.hints:
            problem = _problem(value, sig.hints[key])
            if problem:
                raise ConfigError(f"{path}.{key}{problem[0]}: {problem[1]}")


def to_dataclass(cls: type, value: Any, path: str) -> Any:
    """Check a YAML mapping against dataclass ``cls`` key by key and build it.

    Unknown keys (with a suggestion), missing required fields, wrong types and ``Literal`` choices are reported at
    their nested YAML path (``model.params.inference.sampler``); nested dataclass fields are converted too. An
    instance of ``cls`` is returned unchanged.

    Raises:
        ConfigError: naming ``path`` (and the field) for any problem, including the dataclass's own validation.
    """
    problem = _problem(value, cls)
    if problem:
        raise ConfigError(f"{path}{problem[0]}: {problem[1]}")
    return _convert(value, cls, path)


def _is_dataclass_type(annotation: Any) -> bool:
    return inspect.isclass(annotation) and dataclasses.is_dataclass(annotation)


def _dataclass_fields(cls: type) -> tuple[list[str], list[str], dict[str, Any]]:
    """(init field names, required ones, their resolved annotations) of a dataclass."""
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = [f.name for f in fields]
    required = [f.name for f in fields
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):
        hints = {}
    return names, required, {n: hints[n] for n in names if n in hints}


def _dataclass_problem(value: Any, cls: type) -> tuple[str, str] | None:
    """``_problem`` for a dataclass annotation: a mapping checked field by field (or an instance of it)."""
    if isinstance(value, cls):
        return None
    names, required, hints = _dataclass_fields(cls)
    if not isinstance(value, dict):
        return "", (f"expected a mapping of {cls.__name__} ({', '.join(names)}), got {type(value).__name__} "
                    f"({value!r})")
    for key in value:
        if key not in names:
            return f".{key}", f"unknown key{suggest(key, names)}; valid keys: {', '.join(names)}"
    for name in required:
        if name not in value:
            return f".{name}", f"required key of {cls.__name__} is missing"
    for key, item in value.items():
        problem = _problem(item, hints.get(key, Any))
        if problem:
            return f".{key}{problem[0]}", problem[1]
    return None


def _problem(value: Any, annotation: Any) -> tuple[str, str] | None:
    """Why ``value`` does not fit ``annotation``: (sub-path below the checked key, e.g. ``'.sampler'``, sentence)."""
    if _is_dataclass_type(annotation):
        return _dataclass_problem(value, annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and isinstance(value, dict):
        # a mapping for ``Setting | None``: report the dataclass's own problem at its nested path
        dataclass_args = [a for a in typing.get_args(annotation) if _is_dataclass_type(a)]
        if len(dataclass_args) == 1:
            return _dataclass_problem(value, dataclass_args[0])
    problem = type_problem(value, annotation)
    return None if problem is None else ("", problem)


def _convert(value: Any, annotation: Any, path: str) -> Any:
    """Turn checked mappings into the dataclasses their annotation names (nested ones too); else ``value``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and isinstance(value, dict):
        dataclass_args = [a for a in typing.get_args(annotation) if _is_dataclass_type(a)]
        annotation = dataclass_args[0] if len(dataclass_args) == 1 else annotation
    if not _is_dataclass_type(annotation) or not isinstance(value, dict):
        return value
    _, _, hints = _dataclass_fields(annotation)
    fields = {k: _convert(v, hints.get(k, Any), f"{path}.{k}") for k, v in value.items()}
    try:
        return annotation(**fields)
    except ParamError as err:
        raise ConfigError(f"{path}.{err.param}: {err.problem}") from err
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{path}: {annotation.__name__}: {err}") from err


def type_problem(value: Any, annotation: Any) -> str | None:
    """Return why ``value`` does not fit ``annotation`` (a readable sentence), or ``None`` if it fits.

    Understands the annotations YAML values can meet: builtins, ``Literal``, unions/``Optional``,
    ``list``/``tuple``/``Sequence``/``dict``/``Mapping`` with item types, dataclasses (a mapping checked key by
    key; the sentence starts with the offending key) and ``Any``. Other annotations (classes such as
    ``nn.Module``) accept anything: they are injected or checked by the constructor.
    """
    if annotation is Any or annotation is inspect.Parameter.empty:
        return None
    if _is_dataclass_type(annotation):
        problem = _dataclass_problem(value, annotation)
        return None if problem is None else (f"{problem[0][1:]}: {problem[1]}" if problem[0] else problem[1])
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return None if value in args else f"{value!r} is not one of {', '.join(repr(a) for a in args)}"
    if origin in (typing.Union, types.UnionType):
        problems = [type_problem(value, a) for a in args]
        if any(p is None for p in problems):
            return None
        literal_choices = [repr(c) for a in args if typing.get_origin(a) is typing.Literal for c in typing.get_args(a)]
        if literal_choices:
            return f"{value!r} is not one of {', '.join(literal_choices)} (or another accepted type)"
        return f"expected {_type_name(annotation)}, got {type(value).__name__} ({value!r})"
    if annotation is type(None):
        return None if value is None else f"expected null, got {value!r}"
    if annotation is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return None if ok else f"expected a number, got {type(value).__name__} ({value!r})"
    if annotation is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else f"expected an integer, got {type(value).__name__} ({value!r})"
    if annotation in (bool, str):
        return None if isinstance(value, annotation) else f"expected {annotation.__name__}, got {value!r}"
    return _container_problem(value, origin or annotation, args)


def _container_problem(value: Any, container: Any, args: tuple) -> str | None:
    """``type_problem`` for list/tuple/Sequence and dict/Mapping annotations (anything else fits)."""
    if container in (list, tuple, cabc.Sequence):
        if not isinstance(value, list | tuple):
            return f"expected a list, got {type(value).__name__} ({value!r})"
        if container is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                return f"expected {len(args)} items, got {len(value)} ({value!r})"
            item_types = args
        elif args:
            item_types = (args[0],) * len(value)
        else:
            return None
        for i, (item, item_type) in enumerate(zip(value, item_types, strict=True)):
            problem = type_problem(item, item_type)
            if problem:
                return f"item {i}: {problem}"
        return None
    if container in (dict, cabc.Mapping):
        if not isinstance(value, dict):
            return f"expected a mapping, got {type(value).__name__} ({value!r})"
        if len(args) == 2:
            for k, v in value.items():
                problem = type_problem(k, args[0]) or type_problem(v, args[1])
                if problem:
                    return f"key {k!r}: {problem}"
        return None
    return None


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
