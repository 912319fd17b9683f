"""Conf loading against the base.conf schema, overrides, device, hashing, and no dead keys."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from fitting import conf as C

CONF_FILES = sorted(C.CONF_DIR.glob("*.conf"))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _include_base(tmp_path: Path) -> str:
    """Confs in tmp include the repo's base.conf through a copy beside them."""
    (tmp_path / "base.conf").write_text(C.BASE_CONF.read_text())
    return 'include "base.conf"\n'


@pytest.mark.parametrize("path", CONF_FILES, ids=[p.name for p in CONF_FILES])
def test_every_shipped_conf_loads(path: Path):
    conf = C.load_conf(path)
    assert conf.device in ("cpu", "cuda")
    assert conf.name == path.stem
    assert list(conf.tree["pipeline"]["stages"])


def test_shipped_confs_beyond_base():
    names = {p.stem for p in CONF_FILES}
    assert {"base", "demo_sfs"} <= names
    demo = C.load_conf(C.CONF_DIR / "demo_sfs.conf").tree
    assert demo["data"]["format"] == "fmhr" and demo["data"]["path"] == "demo_data"
    assert demo["data"]["scan_id"] == "1"


def test_unknown_key_names_key_file_and_closest(tmp_path: Path):
    p = _write(tmp_path / "typo.conf", _include_base(tmp_path) + "hand_fit.iterations_ful = 3\n")
    with pytest.raises(C.ConfError) as e:
        C.load_conf(p)
    msg = str(e.value)
    assert "'hand_fit.iterations_ful'" in msg and "typo.conf" in msg and "'hand_fit.iterations_full'" in msg


def test_unknown_key_in_an_included_file_names_that_file(tmp_path: Path):
    inc = _include_base(tmp_path)
    _write(tmp_path / "mid.conf", inc + "pose_fit { huberr = 0.3 }\n")
    top = _write(tmp_path / "top.conf", 'include "mid.conf"\nseed = 3\n')
    with pytest.raises(C.ConfError) as e:
        C.load_conf(top)
    assert "mid.conf" in str(e.value) and "'pose_fit.huber'" in str(e.value)


def test_unknown_section_and_missing_include(tmp_path: Path):
    p = _write(tmp_path / "sec.conf", _include_base(tmp_path) + "hand_fitt { lr_full = 0.1 }\n")
    with pytest.raises(C.ConfError, match="hand_fit.lr_full"):
        C.load_conf(p)
    q = _write(tmp_path / "noinc.conf", 'include "nowhere.conf"\nseed = 1\n')
    with pytest.raises(C.ConfError, match="nowhere.conf"):
        C.load_conf(q)


def test_values_are_typed_by_the_base(tmp_path: Path):
    inc = _include_base(tmp_path)
    bad = _write(tmp_path / "bad.conf", inc + 'hand_fit.iterations_full = "many"\n')
    with pytest.raises(C.ConfError, match="must be of type int"):
        C.load_conf(bad)
    ok = _write(tmp_path / "ok.conf", inc + "hand_fit.lr_full = 1\ndata.scan_id = 7\n")
    tree = C.load_conf(ok).tree
    assert isinstance(tree["hand_fit"]["lr_full"], float) and tree["hand_fit"]["lr_full"] == 1.0
    assert tree["data"]["scan_id"] == "7"
    flag = _write(tmp_path / "flag.conf", inc + "output.report = 1\n")
    with pytest.raises(C.ConfError, match="bool"):
        C.load_conf(flag)


def test_overrides_are_typed_and_checked():
    conf = C.load_conf(
        C.BASE_CONF,
        [
            "hand_fit.iterations_full=50",
            "hand_fit.lr_full=1e-3",
            "output.report=false",
            "data.scan_id=12",
            "pipeline.stages=[pose_fit]",
            "output.mesh_formats=ply,obj",
            "hand_fit.weights.shape_prior=0",
        ],
    )
    t = conf.tree
    assert t["hand_fit"]["iterations_full"] == 50 and isinstance(t["hand_fit"]["iterations_full"], int)
    assert t["hand_fit"]["lr_full"] == pytest.approx(1e-3)
    assert t["output"]["report"] is False
    assert t["data"]["scan_id"] == "12"
    assert list(t["pipeline"]["stages"]) == ["pose_fit"]
    assert list(t["output"]["mesh_formats"]) == ["ply", "obj"]
    assert t["hand_fit"]["weights"]["shape_prior"] == 0.0
    with pytest.raises(C.ConfError, match="did you mean 'hand_fit.iterations_full'"):
        C.load_conf(C.BASE_CONF, ["hand_fit.iteration_full=5"])
    with pytest.raises(C.ConfError, match="is not of type int"):
        C.load_conf(C.BASE_CONF, ["hand_fit.iterations_full=5.5"])
    with pytest.raises(C.ConfError, match="key=value"):
        C.load_conf(C.BASE_CONF, ["hand_fit.iterations_full"])
    with pytest.raises(C.ConfError, match="unknown conf key 'hand_fit'"):
        C.load_conf(C.BASE_CONF, ["hand_fit=3"])


def test_device_is_resolved_once():
    assert C.resolve_device("cpu") == "cpu"
    assert C.resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(C.ConfError, match="device must be one of"):
        C.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(C.ConfError, match="no CUDA"):
            C.load_conf(C.BASE_CONF, ["device=cuda"])
    assert C.load_conf(C.BASE_CONF, ["device=cpu"]).tree["device"] == "cpu"


def test_conf_hash_is_stable_and_selective(tmp_path: Path):
    inc = _include_base(tmp_path)
    a = _write(tmp_path / "a.conf", inc + "hand_fit { lr_full = 0.05\n iterations_full = 10 }\n")
    b = _write(tmp_path / "b.conf", inc + "hand_fit.iterations_full = 10\n\n# same, other order\nhand_fit.lr_full = 5e-2\n")
    ta, tb = C.load_conf(a).tree, C.load_conf(b).tree
    ident = {"scan_id": "1", "path": "/x"}
    assert C.conf_hash(ta, ["hand_fit"], ident) == C.conf_hash(tb, ["hand_fit"], ident)
    assert C.conf_hash(ta, ["hand_fit"], ident) != C.conf_hash(ta, ["hand_fit"], {**ident, "scan_id": "2"})
    tc = C.load_conf(a, ["pose_fit.huber=0.9"]).tree
    assert C.conf_hash(ta, ["hand_fit"], ident) == C.conf_hash(tc, ["hand_fit"], ident)  # other section
    assert C.conf_hash(ta, ["pose_fit"], ident) != C.conf_hash(tc, ["pose_fit"], ident)
    td = C.load_conf(a, ["hand_fit.weights.pose_prior=0.1"]).tree
    assert C.conf_hash(ta, ["hand_fit"], ident) != C.conf_hash(td, ["hand_fit"], ident)  # nested key
    # stable across processes and runs (no Python hash randomisation, key order irrelevant):
    # checkpoints written yesterday must still match today
    assert C.conf_hash({"s": {"y": [1.5, "a"], "x": 1}}, ["s", "missing"], {"scan_id": "1"}) == "17f36c3f006931ca"
    assert C.conf_hash({"s": {"x": 1, "y": [1.5, "a"]}}, ["missing", "s"], {"scan_id": "1"}) == "17f36c3f006931ca"


def test_data_path_resolution(tmp_path: Path):
    assert C.resolve_data_path("demo_data") == C.REPO_ROOT / "demo_data"
    assert C.resolve_data_path("captures/x", cwd=tmp_path) == tmp_path / "captures/x"
    assert C.resolve_data_path(tmp_path) == tmp_path


# --------------------------------------------------------------------------------- no dead keys
def _module_names(path: Path) -> set[str]:
    """String constants, attribute names, dataclass field names and keyword names of a module:
    the ways code reads a conf key (``c["key"]``, ``c.get("a.key")``, ``cfg.key``, fields)."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.keyword) and node.arg:
            names.add(node.arg)
    return names


def _code_files() -> list[Path]:
    skip = {".venv", "tests", ".git", "runs", "out"}
    return [p for p in C.REPO_ROOT.rglob("*.py") if not (set(p.relative_to(C.REPO_ROOT).parts) & skip)]


def _is_read(key: str, modules: list[set[str]]) -> bool:
    """A module reads ``a.b.c`` when it names it whole, or names a prefix section (``a``/``a.b``)
    and the rest of the path (``b.c``/``c``), as one string or as its parts."""
    parts = key.split(".")
    for names in modules:
        if key in names:
            return True
        for i in range(1, len(parts)):
            head, tail = ".".join(parts[:i]), parts[i:]
            if head in names and (".".join(tail) in names or all(t in names for t in tail)):
                return True
        if len(parts) == 1 and parts[0] in names:
            return True
    return False


def test_every_base_key_is_read_by_the_code():
    modules = [_module_names(p) for p in _code_files()]
    dead = [k for k in C.leaf_keys(C.load_base()) if not _is_read(k, modules)]
    assert not dead, f"conf/base.conf keys that no code reads (remove them or read them): {dead}"


def test_dead_key_check_can_fail(tmp_path: Path):
    """The check above must flag a key nothing mentions."""
    modules = [_module_names(p) for p in _code_files()]
    assert not _is_read("hand_fit.zzz_never_read", modules)
    assert _is_read("hand_fit.iterations_full", modules)


# Where each stage-side conf dataclass reads its keys: (module, class) -> base.conf section.
CONF_CLASSES = {
    ("fitting.pose_fit", "PoseFitConf"): "pose_fit",
    ("fitting.hand_fit", "HandFitConf"): "hand_fit",
    ("fitting.init_gcn", "InitConf"): "init",
    ("fitting.silhouette_fit", "SilhouetteFitConf"): "silhouette_fit",
    ("fitting.masks", "MaskConf"): "masks",
    ("fitting.ham", "HamConf"): "ham",
    ("fitting.neural", "NeuralConf"): "neural",
}


def _stage_conf_classes():
    """(section, dataclass) for every conf dataclass (one with ``from_conf``) in fitting/; a new
    one must be added to CONF_CLASSES, so its keys get checked against base.conf."""
    import dataclasses
    import importlib

    out = []
    for path in sorted((C.REPO_ROOT / "fitting").glob("*.py")):
        module = importlib.import_module(f"fitting.{path.stem}")
        for obj in vars(module).values():
            if isinstance(obj, type) and dataclasses.is_dataclass(obj) and hasattr(obj, "from_conf") \
                    and obj.__module__ == module.__name__:
                key = (module.__name__, obj.__name__)
                assert key in CONF_CLASSES, f"{key} reads conf keys: add it to CONF_CLASSES with its section"
                out.append((CONF_CLASSES[key], obj))
    return out


def test_base_conf_holds_every_stage_key_with_the_stage_default():
    """A key a stage reads but base.conf lacks could not be set at all (unknown key); a different
    default would make base.conf lie about what a run does."""
    import dataclasses

    base = C.load_base()
    classes = _stage_conf_classes()
    assert {n for n, _ in classes} >= {"pose_fit", "hand_fit"}
    stage_sections = {s for s, _ in classes} - {"masks"}
    from fitting.pipeline import REGISTRY

    assert stage_sections <= set(REGISTRY), "a stage with conf keys is missing from the pipeline registry"
    problems = []
    for stage, cls in classes:
        for f in dataclasses.fields(cls):
            key = f"{stage}.{f.name}"
            if not C._has(base, key):
                problems.append(f"{key} missing from base.conf")
                continue
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            if C.to_plain(C._lookup(base, key)) != default:
                problems.append(f"{key}: base.conf {C.to_plain(C._lookup(base, key))!r} != stage default {default!r}")
        extra = set(base[stage]) - {f.name for f in dataclasses.fields(cls)}
        problems += [f"{stage}.{k} in base.conf but not a field of {cls.__name__}" for k in sorted(extra)]
    assert not problems, problems


def test_resolved_conf_reloads_to_the_same_tree(tmp_path: Path):
    """fit.py saves conf.resolved.conf beside the outputs; it must reproduce the run's conf."""
    conf = C.load_conf(C.CONF_DIR / "demo_sfs.conf", ["hand_fit.lr_full=0.003", "pipeline.stages=[pose_fit]"])
    saved = _write(tmp_path / "resolved.conf", conf.to_hocon())
    again = C.load_conf(saved)
    assert C.to_plain(again.tree) == C.to_plain(conf.tree)
