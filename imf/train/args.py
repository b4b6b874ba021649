"""The one path from a config file and the command line to a :class:`~imf.train.config.TrainConfig`.

The options are generated from the schema's fields: ``--section.field VALUE`` for every leaf field
(``--optim.lr 3e-4``, ``--data.batch_size 256``), ``--model.FIELD`` / ``--loss.FIELD`` for the
:class:`~imf.config.ModelConfig` / :class:`~imf.config.LossConfig` fields, and the short aliases
declared on the fields (``--lr``, ``--batch``, ``--data``, ``--out``, ``--resume``, ...). Dashes and
underscores in option names are the same. Values are read as YAML scalars or lists (``--optim.betas
[0.9,0.95]``) and converted to the field's type; a boolean given without a value is true and a bare
``--resume`` means ``auto``. Files (``--config F``: ``.yaml``/``.yml``/``.json``/``.toml``) use the same
nested names. Every mistake raises :class:`ConfigError` with one line that names the option or the
file and line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import types
import typing
from pathlib import Path

import yaml

from imf.cli import DEBUG_HELP, ArgumentParser
from imf.train.config import PRESET_DEFAULTS, ConfigError, TrainConfig


def _unwrap_optional(tp):
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return tp, False


def _type_name(tp) -> str:
    tp, optional = _unwrap_optional(tp)
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        name = f"[{_type_name(args[0])}, ...]" if args[-1] is Ellipsis else f"[{', '.join(map(_type_name, args))}]"
    else:
        name = getattr(tp, "__name__", str(tp))
    return f"{name} | None" if optional else name


def coerce(value, tp, where: str):
    """Convert a parsed YAML/TOML/CLI value to the annotated type ``tp`` (or raise ConfigError)."""
    tp, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{where} may not be null")
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            if isinstance(value, bool):
                return value
        elif tp is int:
            if not isinstance(value, bool) and not (isinstance(value, float) and not value.is_integer()):
                return int(value)
        elif tp is float:
            if not isinstance(value, bool) and math.isfinite(float(value)):
                return float(value)
        elif tp is str:
            if isinstance(value, str | int | float) and not isinstance(value, bool):
                return str(value)
        elif origin is tuple:
            if isinstance(value, str):
                value = yaml.safe_load(value if value.startswith("[") else f"[{value}]")
            value = value if isinstance(value, list | tuple) else [value]
            args = typing.get_args(tp)
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
            if len(value) == len(args):
                return tuple(coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    except (TypeError, ValueError, yaml.YAMLError):
        pass
    raise ConfigError(f"{where}: cannot use {value!r} as {_type_name(tp)}")


def merge(obj, updates: dict, where: str = "") -> None:
    """Apply a nested dict of ``updates`` to dataclass ``obj`` in place, converting types."""
    if not isinstance(updates, dict):
        raise ConfigError(f"{where.rstrip('.') or 'config'} must be a mapping, got {updates!r}")
    hints = typing.get_type_hints(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in updates.items():
        name = str(key).replace("-", "_")
        path = f"{where}{name}"
        if name not in fields:
            raise ConfigError(f"unknown config field {path!r}; valid fields here: {sorted(fields)}")
        current, schema = getattr(obj, name), fields[name].metadata.get("schema")
        if dataclasses.is_dataclass(current):
            merge(current, value, f"{path}.")
        elif schema is not None:  # a dict of overrides of ``schema``'s fields; they add up layer by layer
            setattr(obj, name, {**current, **_schema_values(schema, value, path)})
        else:
            setattr(obj, name, coerce(value, hints[name], path))


def _schema_values(schema, value, path: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{path} must be a mapping of {schema.__name__} fields, got {value!r}")
    hints = typing.get_type_hints(schema)
    out = {}
    for key, v in value.items():
        name = str(key).replace("-", "_")
        if name not in hints or name == "method":
            valid = sorted(set(hints) - {"method"})
            raise ConfigError(f"unknown {schema.__name__} field {f'{path}.{name}'!r}; valid: {valid}")
        out[name] = coerce(v, hints[name], f"{path}.{name}")
    return out


def read_file(path: str) -> dict:
    """The nested mapping in a ``.yaml``/``.yml``/``.json``/``.toml`` file; syntax errors name the file and line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"config file {path!r} does not exist" if not p.exists() else f"config file {path!r} is not a file"
        )
    text = p.read_text()
    if p.suffix == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path}: invalid TOML: {e}") from None
    elif p.suffix in (".yaml", ".yml", ".json"):
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).split("\n")[0]
            raise ConfigError(f"config file {path}{where}: invalid YAML: {problem}") from None
    else:
        raise ConfigError(f"config file {path!r}: use .yaml, .yml, .toml or .json")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping at the top level")
    return data


def build_config(file_data: dict | None = None, overrides: dict | None = None, *, file: str = "") -> TrainConfig:
    """Defaults -> preset defaults -> ``file_data`` -> ``overrides`` (nested dicts); not yet validated."""
    file_data, overrides = file_data or {}, overrides or {}
    cfg = TrainConfig()
    name = overrides.get("preset", file_data.get("preset", cfg.preset))
    merge(cfg, PRESET_DEFAULTS.get(str(name), {}))
    try:
        merge(cfg, file_data)
    except ConfigError as e:
        raise ConfigError(f"config file {file}: {e}" if file else str(e)) from None
    merge(cfg, overrides)
    return cfg


def _leaves(cls, prefix: str = ""):
    """``(path, type, field)`` of every option the schema ``cls`` offers, depth first."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path, schema = f"{prefix}{f.name}", f.metadata.get("schema")
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaves(hints[f.name], f"{path}.")
        elif schema is not None:
            sub = typing.get_type_hints(schema)
            for g in dataclasses.fields(schema):
                if g.name != "method":
                    yield f"{path}.{g.name}", sub[g.name], g
        else:
            yield path, hints[f.name], f


def _default_of(cfg: TrainConfig, path: str):
    """The value ``path`` takes under ``cfg``; a model/loss field's is the resolved one (preset and overrides)."""
    section, _, name = path.partition(".")
    if section in ("model", "loss") and name:
        try:
            resolved = cfg.model_config() if section == "model" else cfg.loss_config()
        except (ConfigError, ValueError, KeyError):  # an unknown preset: the error comes when parsing
            return "per preset"
        node = getattr(resolved, name)
    else:
        node = cfg
        for part in path.split("."):
            node = getattr(node, part)
    return list(node) if isinstance(node, tuple) else node


def _help_of(path: str, f: dataclasses.Field) -> str:
    """A field's one line of help (its metadata), or what it is when it has none."""
    if f.metadata.get("help"):
        return f.metadata["help"]
    section = path.split(".")[0]
    schema = {"model": "imf.config.ModelConfig", "loss": "imf.config.LossConfig"}.get(section)
    return f"{schema}.{f.name}" if schema else f"{section} field"


def add_config_options(parser: argparse.ArgumentParser, defaults: TrainConfig, paths: list[str] | None = None) -> None:
    """Add ``--path`` (and its alias) for every schema field, or only those in ``paths``; help shows
    ``defaults``' value (the resolved preset's for model and loss fields). Parsed values land in the
    namespace under their dotted path."""
    groups = {}
    for path, tp, f in _leaves(TrainConfig):
        if paths is not None and path not in paths:
            continue
        section = path.split(".")[0] if "." in path else "run"
        if section not in groups:
            groups[section] = parser.add_argument_group(f"{section} options" if section != "run" else "run options")
        names = [f"--{path}"] + ([f"--{f.metadata['alias']}"] if f.metadata.get("alias") else [])
        kw = {"dest": path, "default": argparse.SUPPRESS, "metavar": _type_name(tp).upper()}
        if _unwrap_optional(tp)[0] is bool:
            kw.update(nargs="?", const="true")
        if path == "checkpoint.resume":
            kw.update(nargs="?", const="auto")
        help_text, value = _help_of(path, f), _default_of(defaults, path)
        if value is not None:  # the value replaces what the help says the default is ("from epochs")
            help_text = f"{re.sub(r' ?[(]default: [^)]*[)]', '', help_text)} (default: {value})"
        elif "default" not in help_text:  # the help of a None default says what None means
            help_text = f"{help_text} (default: none)"
        groups[section].add_argument(*names, help=help_text.replace("%", "%%"), **kw)


def preset_of(argv: list[str]) -> str:
    """The ``--preset`` an (unparsed) command line asks for, else its ``--config`` file's, else the default;
    what ``--help`` shows the defaults of."""
    argv = normalise(list(argv))
    found = {"preset": TrainConfig().preset}
    for key in ("config", "preset"):  # the option wins over the file
        for i, tok in enumerate(argv):
            if tok.startswith(f"--{key}="):
                found[key] = tok.split("=", 1)[1]
            elif tok == f"--{key}" and i + 1 < len(argv):
                found[key] = argv[i + 1]
        if key == "config" and "config" in found:
            try:
                found["preset"] = str(read_file(found["config"]).get("preset", found["preset"]))
            except ConfigError:  # reported when the command line is parsed
                pass
    return found["preset"]


def normalise(argv: list[str]) -> list[str]:
    """``--grad-accum=2`` -> ``--grad_accum=2``: dashes and underscores in option names are the same."""
    out = []
    for tok in argv:
        if tok.startswith("--") and len(tok) > 2:
            name, eq, value = tok[2:].partition("=")
            tok = f"--{name.replace('-', '_')}{eq}{value}"
        out.append(tok)
    return out


def overrides_of(namespace: argparse.Namespace, paths: list[str] | None = None) -> dict:
    """The nested override dict of the config options given on the command line."""
    nested: dict = {}
    for path, _, _ in _leaves(TrainConfig):
        if path in vars(namespace) and (paths is None or path in paths):
            raw = getattr(namespace, path)
            *parents, leaf = path.split(".")
            node = nested
            for part in parents:
                node = node.setdefault(part, {})
            try:
                node[leaf] = yaml.safe_load(raw) if isinstance(raw, str) and raw != "" else raw
            except yaml.YAMLError:
                node[leaf] = raw
    return nested


def train_parser(
    prog: str = "python -m imf.train", description: str | None = None, preset: str | None = None
) -> ArgumentParser:
    """The trainer's parser (argparse errors are :class:`ConfigError`): ``--config FILE``, ``--debug`` and every
    schema field, with the defaults of ``preset`` in the help (default: the schema's)."""
    preset = preset or TrainConfig().preset
    p = ArgumentParser(
        error_type=ConfigError,
        prog=prog,
        description=description,
        epilog=f"Defaults shown are those of --preset {preset}; --preset NAME --help shows another preset's.",
        allow_abbrev=False,
        usage=f"{prog} [--config FILE] [--OPTION VALUE ...]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE", help="a .yaml/.yml/.json/.toml file with the same nested fields")
    p.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    add_config_options(p, build_config(overrides={"preset": preset}))
    return p


def load_config(argv: list[str], world_size: int = 1, *, parser: ArgumentParser | None = None) -> TrainConfig:
    """The run's configuration from ``--config FILE`` and ``--key value`` options, validated."""
    ns = (parser or train_parser()).parse_args(normalise(list(argv)))
    config_file = getattr(ns, "config", None)
    file_data = read_file(config_file) if config_file else {}
    return build_config(file_data, overrides_of(ns), file=config_file or "").validate(world_size)


def dump_config(cfg: TrainConfig) -> str:
    """YAML of the resolved configuration (readable back with ``--config``)."""
    return yaml.safe_dump(json.loads(json.dumps(cfg.to_dict())), sort_keys=False)


__all__ = [
    "add_config_options",
    "build_config",
    "coerce",
    "dump_config",
    "load_config",
    "merge",
    "normalise",
    "overrides_of",
    "preset_of",
    "read_file",
    "train_parser",
]
