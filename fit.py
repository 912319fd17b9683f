#!/usr/bin/env python
"""Fit hands to one capture and write the results.

    .venv/bin/python fit.py --conf conf/demo_sfs.conf --scan_id 1 \\
        [--data_path DIR] [--out DIR] [--set key=value ...] [--restart]

- ``--scan_id A-B`` (a range, e.g. ``0-29``) runs sequence mode on the frames A..B
  (``fitting/sequence.py``: per-frame prediction, one calibrated shape per hand, test-time
  optimisation of every frame), e.g. with ``conf/identity.conf``.
- ``--data_path`` defaults to the conf's ``data.path``. A relative path resolves against the
  current directory, except the embedded default ``demo_data``, which resolves against the repo
  root so the demo runs from anywhere.
- ``--out`` defaults to the conf's ``output.dir``, and when that is empty to
  ``runs/<conf name>/<scan_id>`` under the current directory.
- Finished stages are resumed from ``<out>/stages/`` when their conf is unchanged; ``--restart``
  recomputes everything.
- Input problems (bad scan, camera, conf, missing model file) print one line and exit with 2.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fitting.conf import Conf, ConfError, load_conf, resolve_data_path

EXIT_INPUT_ERROR = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Fine-grained hand reconstruction: fit one capture.")
    ap.add_argument("--conf", required=True, help="conf file, e.g. conf/demo_sfs.conf")
    ap.add_argument("--scan_id", default=None, help="scan inside the data path, or a range A-B of scans for sequence mode (default: the conf's data.scan_id)")
    ap.add_argument("--data_path", default=None, help="folder of scans (default: the conf's data.path)")
    ap.add_argument("--out", default=None, help="output folder (default: runs/<conf name>/<scan_id>)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a conf key, e.g. --set hand_fit.iterations_full=50 (repeatable)")
    ap.add_argument("--restart", action="store_true", help="recompute every stage, ignoring checkpoints")
    return ap.parse_args(argv)


def prepare(args: argparse.Namespace) -> tuple[Conf, Path, str, Path]:
    """Conf with the command line applied, the resolved data path, the scan id, the out dir."""
    overrides = list(args.overrides)
    if args.scan_id is not None:
        overrides.append(f"data.scan_id={args.scan_id}")
    if args.data_path is not None:
        overrides.append(f"data.path={args.data_path}")
    conf = load_conf(args.conf, overrides)
    scan_id = str(conf.tree["data"]["scan_id"])
    data_path = resolve_data_path(str(conf.tree["data"]["path"]))
    if not data_path.exists():
        raise ConfError(f"data path {data_path} does not exist (from --data_path or data.path in {conf.path})")
    if args.out is not None:
        out = Path(args.out)
    elif str(conf.tree["output"]["dir"]):
        out = Path(str(conf.tree["output"]["dir"]))
    else:
        out = Path("runs") / conf.name / scan_id
    return conf, data_path, scan_id, out


def run(args: argparse.Namespace) -> int:
    from export.atomic import write_text
    from export.outputs import write_outputs
    from fitting.pipeline import read_scan, run_pipeline, scan_identity, setup_logging

    conf, data_path, scan_id, out = prepare(args)
    from fitting.sequence import parse_scan_range, run_cli

    if parse_scan_range(scan_id) is not None:  # "A-B": a sequence of frames (fitting/sequence.py)
        return run_cli(conf, data_path, scan_id, out, list(args.overrides), resolve_scale)
    tree = conf.tree
    resolve_scale(tree, data_path, scan_id)
    log = setup_logging(out, str(tree["log"]["level"]))
    log.info("conf %s%s, device %s", conf.path, "".join(f" --set {o}" for o in args.overrides), conf.device)
    log.info("scan %s from %s (%s, scale %g); output %s", scan_id, data_path, tree["data"]["format"],
             float(tree["data"]["scale"]), out)
    write_text(out / "conf.resolved.conf", conf.to_hocon() + "\n")
    check_hand_model(tree)
    start = time.perf_counter()
    scan = read_scan(tree, data_path, scan_id)
    log.info("read %d views, sides %s, in %.1f s", len(scan.views), list(scan.sides), time.perf_counter() - start)
    identity = scan_identity(tree, data_path, scan_id)
    state = run_pipeline(scan, tree, out, identity=identity, restart=args.restart)
    run_info = {"conf": conf.name, "conf_path": str(conf.path), "overrides": list(args.overrides),
                "scan_id": scan_id, "data_path": str(data_path), "data_format": str(tree["data"]["format"]),
                "scale": float(tree["data"]["scale"]), "device": conf.device,
                "stages": list(tree["pipeline"]["stages"])}
    write_outputs(scan, state, tree, out, run_info)
    log.info("done in %.1f s: %s", time.perf_counter() - start, out / "report.html")
    return 0


def resolve_scale(tree, data_path: Path, scan_id: str) -> None:
    """``data.width`` > 0 fits at that image width whatever the capture's size (the same conf then
    suits a 320-px synthetic scan and a 1280-px capture): it becomes ``data.scale`` here, once, so
    every stage and the checkpoints' identity read one number."""
    width = int(tree["data"]["width"])
    if width <= 0:
        return
    from fitting.pipeline import read_scan

    header = tree.copy()
    header.put("data.scale", 1.0, append=False)
    probe = read_scan(header, data_path, scan_id, load_images=False)
    tree.put("data.scale", width / probe.views[0].camera.width, append=False)


def check_hand_model(tree) -> None:
    """Fail before any stage runs when a stage needs a hand model whose files are missing."""
    from fitting.pipeline import stage_specs

    if any("hand_model" in s.conf_sections for s in stage_specs(tree["pipeline"]["stages"])):
        import handmodel

        for side in ("right", "left"):
            handmodel.load_data(str(tree["hand_model"]["name"]), side)


def input_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean 'fix your input', reported as one line rather than a traceback."""
    from capture.camera import CameraError
    from capture.scan import ScanError
    from export.atomic import NonFiniteError
    from handmodel import HandModelError

    return (ConfError, ScanError, CameraError, HandModelError, FileNotFoundError, NonFiniteError)


def main(argv: list[str] | None = None) -> int:
    from fitting.pipeline import reset_logging

    args = parse_args(argv)
    try:
        return run(args)
    except input_errors() as e:
        print(f"error: {type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt:
        print("interrupted; finished stages are kept and a rerun resumes after them", file=sys.stderr)
        return 130
    finally:
        reset_logging()


if __name__ == "__main__":
    sys.exit(main())
