"""Run configuration: pyhocon confs checked against one schema, ``conf/base.conf``.

Why a schema: a typo in a conf key (``ham.epoch = 5``) would otherwise be silently ignored and the
run would use the default. Every leaf key of a loaded conf must exist in ``base.conf``; values must
have the base value's type (ints are accepted for floats, numbers for strings). Command-line
overrides (``--set ham.epochs=50``) are parsed by the type of the base value.

``conf.device`` (``auto|cpu|cuda``) is resolved once here, so every stage sees ``cpu`` or ``cuda``.
``conf_hash`` hashes a set of sections plus an identity record (which scan) for checkpoint matching.
"""
from __future__ import annotations

import copy
import difflib
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from pyhocon import ConfigFactory, ConfigTree, HOCONConverter
from pyhocon.exceptions import ConfigException

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"
BASE_CONF = CONF_DIR / "base.conf"
DEVICES = ("auto", "cpu", "cuda")
# The data path shipped as the default; it alone resolves against the repo root (see resolve_data_path).
EMBEDDED_DATA_PATH = "demo_data"
# Keys that do not change a stage's result and so stay out of checkpoint hashes.
UNHASHED_KEYS = ("device", "log", "output")

_INCLUDE_RE = re.compile(r"""^\s*include\s+(?:(?:file|required)\(\s*)*["']([^"']+)["']""", re.MULTILINE)


class ConfError(ValueError):
    """A conf that cannot be used; the message names the key, the file and the likely fix."""


@dataclass
class Conf:
    """A loaded, checked conf. ``tree`` is what stages receive; ``name`` is the conf file's stem."""

    tree: ConfigTree
    path: Path
    name: str
    overrides: list[str] = field(default_factory=list)

    @property
    def device(self) -> str:
        return str(self.tree["device"])

    def to_hocon(self) -> str:
        return HOCONConverter.to_hocon(self.tree)


# ---------------------------------------------------------------------------------------- loading
def load_conf(
    path: str | Path,
    overrides: Iterable[str] = (),
    *,
    base_path: str | Path = BASE_CONF,
) -> Conf:
    """Load ``path`` (which should ``include "base.conf"``), check it against the schema, apply
    ``--set`` style overrides, and resolve ``device``."""
    path = Path(path)
    if not path.is_file():
        raise ConfError(f"conf file {path} not found; confs live in {_display(CONF_DIR)}")
    base_path = Path(base_path)
    base = _parse(base_path)
    _check_includes(path)
    tree = _parse(path)
    _check_against_schema(tree, base, path)
    merged = ConfigTree.merge_configs(_deep_copy(base), tree)
    overrides = list(overrides)
    for item in overrides:
        apply_override(merged, base, item)
    merged.put("device", resolve_device(str(merged["device"])), append=False)
    return Conf(tree=merged, path=path, name=path.stem, overrides=overrides)


def load_base(base_path: str | Path = BASE_CONF) -> ConfigTree:
    """The schema itself, as a tree of defaults."""
    return _parse(Path(base_path))


_PARSE_CACHE: dict[tuple, dict[str, Any]] = {}


def _parse(path: Path) -> ConfigTree:
    """Parse a conf file (with its includes). pyhocon takes ~0.3 s per file, so results are
    cached by the (path, mtime, size) of every file of the include chain, and copied out."""
    try:
        key = tuple((str(p.resolve()), p.stat().st_mtime_ns, p.stat().st_size) for p in _include_chain(path))
    except OSError:
        key = ()
    if key and key in _PARSE_CACHE:
        return ConfigFactory.from_dict(copy.deepcopy(_PARSE_CACHE[key]))
    try:
        tree = ConfigFactory.parse_file(str(path))
    except ConfigException as e:
        raise ConfError(f"{_display(path)}: cannot parse: {e}") from None
    except Exception as e:  # pyparsing errors carry the line and column
        raise ConfError(f"{_display(path)}: syntax error: {e}") from None
    if key:
        _PARSE_CACHE[key] = to_plain(tree)
    return tree


def _check_includes(path: Path, seen: set[Path] | None = None) -> None:
    """pyhocon only warns about a missing include; a missing base.conf must be an error."""
    seen = seen if seen is not None else set()
    if path in seen:
        return
    seen.add(path)
    for name in _INCLUDE_RE.findall(path.read_text()):
        inc = (path.parent / name) if not Path(name).is_absolute() else Path(name)
        if not inc.is_file():
            raise ConfError(f"{_display(path)}: include {name!r} not found (looked for {_display(inc)})")
        _check_includes(inc, seen)


def _include_chain(path: Path) -> list[Path]:
    """The conf file then the files it includes, depth first, each once."""
    out: list[Path] = []

    def visit(p: Path) -> None:
        if p in out or not p.is_file():
            return
        out.append(p)
        for name in _INCLUDE_RE.findall(p.read_text()):
            visit(p.parent / name)

    visit(path)
    return out


def _defining_file(path: Path, key: str) -> Path:
    """Which file of the include chain sets ``key`` itself (not through an include)."""
    for p in _include_chain(path):
        text = _INCLUDE_RE.sub("", p.read_text())
        try:
            own = ConfigFactory.parse_string(text, resolve=False)
        except Exception:
            continue
        if key in set(leaf_keys(own)):
            return p
    return path


# ----------------------------------------------------------------------------------------- schema
def leaf_keys(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of every non-tree value (lists are leaves)."""
    keys: list[str] = []
    for k, v in tree.items():
        full = f"{prefix}{k}"
        if isinstance(v, Mapping):
            keys.extend(leaf_keys(v, full + "."))  # an empty section has no keys to check
        else:
            keys.append(full)
    return keys


def _lookup(tree: Mapping[str, Any], key: str) -> Any:
    node: Any = tree
    for part in key.split("."):
        node = node[part]
    return node


def _has(tree: Mapping[str, Any], key: str) -> bool:
    try:
        _lookup(tree, key)
        return True
    except (KeyError, TypeError, ConfigException):
        return False


def _unknown_key_error(key: str, base: ConfigTree, source: str) -> ConfError:
    valid = leaf_keys(base)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not close:  # compare the last component within the same section, then anywhere
        last = key.split(".")[-1]
        by_last = {k.split(".")[-1]: k for k in valid}
        hit = difflib.get_close_matches(last, list(by_last), n=1, cutoff=0.6)
        close = [by_last[hit[0]]] if hit else []
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfError(f"unknown conf key '{key}' in {source}{hint} (every key must exist in conf/base.conf)")


def _check_against_schema(tree: ConfigTree, base: ConfigTree, path: Path) -> None:
    for key in leaf_keys(tree):
        if not _has(base, key):
            raise _unknown_key_error(key, base, _display(_defining_file(path, key)))
        base_value = _lookup(base, key)
        if isinstance(base_value, Mapping):
            raise ConfError(f"{_display(_defining_file(path, key))}: '{key}' is a section in base.conf, not a value")
        value = _lookup(tree, key)
        try:
            coerced = _coerce(value, base_value, key, "")
        except ConfError:  # name the file only now: finding it means re-parsing the include chain
            _coerce(value, base_value, key, _display(_defining_file(path, key)))
            raise
        if coerced is not value:
            tree.put(key, coerced, append=False)


def _type_name(v: Any) -> str:
    return {bool: "bool", int: "int", float: "float", str: "string", list: "list"}.get(type(v), type(v).__name__)


def _coerce(value: Any, base_value: Any, key: str, source: str) -> Any:
    """``value`` checked against the type of ``base_value`` (None in base accepts anything)."""
    if base_value is None or value is None:
        return value
    bad = ConfError(
        f"conf key '{key}'{' in ' + source if source else ''} must be of type {_type_name(base_value)} like the default "
        f"{json.dumps(base_value)}, got {value!r}"
    )
    if isinstance(base_value, bool):
        if isinstance(value, bool):
            return value
        raise bad
    if isinstance(base_value, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if isinstance(base_value, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if isinstance(base_value, str):
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    if isinstance(base_value, list):
        if not isinstance(value, list):
            raise bad
        if base_value:
            proto = base_value[0]
            return [_coerce(v, proto, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return value
    return value


# -------------------------------------------------------------------------------------- overrides
def parse_override(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ConfError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfError(f"--set expects key=value, got {item!r}")
    return key, raw.strip()


def apply_override(tree: ConfigTree, base: ConfigTree, item: str) -> None:
    """Apply one ``key=value`` to ``tree``, typed by the base value of ``key``."""
    key, raw = parse_override(item)
    if not _has(base, key) or isinstance(_lookup(base, key), Mapping):
        raise _unknown_key_error(key, base, f"--set {item}")
    base_value = _lookup(base, key)
    tree.put(key, _parse_typed(raw, base_value, key, item), append=False)


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _parse_typed(raw: str, base_value: Any, key: str, item: str) -> Any:
    where = f"--set {item}"
    try:
        if isinstance(base_value, bool):
            low = raw.lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError
        if isinstance(base_value, int):
            return int(raw)
        if isinstance(base_value, float):
            return float(raw)
        if isinstance(base_value, str):
            return raw[1:-1] if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'" else raw
        if isinstance(base_value, list):
            text = raw if raw.startswith("[") else "[" + raw + "]"
            value = ConfigFactory.parse_string("v = " + text)["v"]
            return _coerce(list(value), base_value, key, where)
        if raw.lower() == "null":
            return None
        return ConfigFactory.parse_string("v = " + raw)["v"]
    except ConfError:
        raise
    except Exception:
        raise ConfError(
            f"{where}: '{raw}' is not of type {_type_name(base_value)} (the type of the default "
            f"{json.dumps(base_value)})"
        ) from None


# ----------------------------------------------------------------------------------------- device
def resolve_device(value: str) -> str:
    """``auto`` -> ``cuda`` when available else ``cpu``; asking for ``cuda`` without it is an error."""
    if value not in DEVICES:
        raise ConfError(f"device must be one of {DEVICES}, got {value!r}")
    import torch

    if value == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if value == "cuda" and not torch.cuda.is_available():
        raise ConfError("device = cuda but torch finds no CUDA device; use device = auto or cpu")
    return value


# ------------------------------------------------------------------------------------------- hash
def to_plain(value: Any) -> Any:
    """ConfigTrees and tuples -> plain dicts/lists (JSON-able)."""
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def conf_hash(tree: Mapping[str, Any], sections: Iterable[str], identity: Mapping[str, Any] | None = None) -> str:
    """Stable hex digest of the named sections (missing ones hash as absent) plus ``identity``.

    Stable: keys sorted, floats via JSON, independent of include order and of file formatting."""
    payload: dict[str, Any] = {}
    for s in sorted(set(sections)):
        payload[s] = to_plain(_lookup(tree, s)) if _has(tree, s) else None
    payload["__identity__"] = to_plain(dict(identity or {}))
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------ dataclass sections
def section_dataclass(cls: type, conf: Mapping[str, Any] | None, section: str,
                      terms: Iterable[str] | None = None) -> Any:
    """An instance of the dataclass ``cls`` (its defaults) with the keys of ``conf[section]``
    (no conf or no section: the defaults). Scalars are converted by the type of their default; a
    dict field (``weights``) is merged into its default, its keys checked against ``terms``
    (``KeyError`` naming the unknown ones). Fields that need more checks are checked by the caller."""
    import dataclasses

    tree: Mapping[str, Any] = conf[section] if conf is not None and section in conf else {}
    known = None if terms is None else tuple(terms)
    out = cls()
    for f in dataclasses.fields(out):
        if f.name not in tree:
            continue
        default, value = getattr(out, f.name), tree[f.name]
        if isinstance(default, dict):
            given = {str(k): type(next(iter(default.values()), 0.0))(v) for k, v in value.items()}
            if known is not None:
                unknown = sorted(set(given) - set(known))
                if unknown:
                    raise KeyError(f"{section}.{f.name} names unknown terms {unknown}; known: {list(known)}")
            setattr(out, f.name, {**default, **given})
        elif isinstance(default, list):
            setattr(out, f.name, list(to_plain(value)))
        else:
            setattr(out, f.name, type(default)(value))
    return out


# ------------------------------------------------------------------------------------------ paths
def resolve_data_path(value: str | Path, cwd: Path | None = None) -> Path:
    """Where the captures are. The embedded default ``demo_data`` resolves against the repo root
    (so ``fit.py`` works from any directory); any other relative path against the current
    directory, like any command-line path."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return p
    if str(value).rstrip("/") == EMBEDDED_DATA_PATH:
        return REPO_ROOT / p
    return (cwd or Path.cwd()) / p


def _display(path: Path) -> str:
    """A path as the user should read it: relative to the CWD when inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _deep_copy(tree: ConfigTree) -> ConfigTree:
    return ConfigFactory.from_dict(to_plain(tree))
