"""Train the GCN predictor on synthetic keypoint -> mesh pairs drawn on the fly from the hand model.

    python scripts/train_gcn.py --config small          # CPU, the committed weights
    python scripts/train_gcn.py --config full --device cuda

The branches train one after the other:
- ``3d``: the mesh network (swing-IK prior + spiral decoder + parameter head) on 3D keypoints in
  the palm frame. Losses, in that frame: L1 on the GCN vertices, an edge-length term, L1 of the
  hand model driven by the predicted parameters against the true vertices and joints, a
  consistency term of that model mesh against the (detached) GCN mesh, and small direct terms on
  betas, hand_pose and the wrist rotation (they disambiguate what the mesh alone leaves free).
- ``2d``: the keypoint lifter (networks/lifter.py) on 2D keypoints of random cameras, L1 on the
  root-relative 3D keypoints; at inference its output feeds the 3D branch.

Checkpoints (``--ckpt-dir``, every ``--ckpt-every`` steps and at the end) hold the networks,
optimisers, schedules and the samplers' generator states, so ``--resume`` continues the same run.
The validation split uses its own seed (``--val-seed``); evaluation (scripts/eval_gcn.py) another
one. At the end the weights go to ``--out`` (branches not trained in this run are kept from an
existing file) with the configs, the command and the validation numbers.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import handmodel  # noqa: E402
from fitting import metrics as M  # noqa: E402
from networks.gcn import HandMeshGCN  # noqa: E402
from networks.lifter import KeypointLifter, LifterConfig  # noqa: E402
from networks.hierarchy import MeshHierarchy  # noqa: E402
from networks.predictor import BRANCHES, WEIGHTS_FILE, WEIGHTS_FORMAT, build_network, hierarchy_digest, storage_state  # noqa: E402
from networks.synthetic_pairs import Pair, PairSampler  # noqa: E402

CONFIGS = {
    "small": {"steps": 2000, "batch": 32, "lr": 2e-3, "val_every": 250, "val_size": 256,
              "lift_steps": 12000, "lift_batch": 128, "lift_lr": 1e-3, "lift_pool": 60000},
    "full": {"steps": 60000, "batch": 256, "lr": 1e-3, "val_every": 2000, "val_size": 2048,
             "lift_steps": 200000, "lift_batch": 1024, "lift_lr": 1e-3, "lift_pool": 1000000},
}
WEIGHTS = {"vertices": 1.0, "edges": 1.0, "param_vertices": 1.0, "param_joints": 1.0, "consistency": 0.2, "betas": 0.002, "hand_pose": 0.05, "rotation": 0.1}
TRAIN_SEED_3D, TRAIN_SEED_2D = 1000, 2000


def param_mesh(model: handmodel.HandModel, out: dict[str, torch.Tensor], unit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertices and joints (in the branch frame) of the hand model driven by the predicted params."""
    o = model(out["betas"], out["hand_pose"])
    R, t = out["rotation"], out["translation"]
    f = lambda x: torch.einsum("bij,bnj->bni", R, x) / unit[:, None, None] + t[:, None]  # noqa: E731
    return f(o.vertices), f(o.joints)


def losses(model: handmodel.HandModel, out: dict[str, torch.Tensor], pair: Pair, edges: torch.Tensor) -> dict[str, torch.Tensor]:
    v = out["vertices"]
    pv, pj = param_mesh(model, out, pair.unit)
    e_pred = (v[:, edges[:, 0]] - v[:, edges[:, 1]]).norm(dim=-1)
    e_true = (pair.vertices[:, edges[:, 0]] - pair.vertices[:, edges[:, 1]]).norm(dim=-1)
    return {
        "vertices": (v - pair.vertices).abs().mean(),
        "edges": (e_pred - e_true).abs().mean(),
        "param_vertices": (pv - pair.vertices).abs().mean(),
        "param_joints": (pj - pair.joints).abs().mean(),
        "consistency": (pv - v.detach()).abs().mean(),
        "betas": ((out["betas"] - pair.betas) ** 2).mean(),
        "hand_pose": ((out["hand_pose"] - pair.hand_pose) ** 2).mean(),
        "rotation": ((out["rotation"] - pair.rotation) ** 2).mean(),
    }


def mesh_edges(faces: torch.Tensor) -> torch.Tensor:
    e = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    return torch.unique(torch.sort(e, dim=1).values, dim=0)


def val_batches(model: handmodel.HandModel, seed: int, n: int) -> dict[str, Pair]:
    """Held-out validation pairs of the mesh branch: clean 3D keypoints."""
    s = PairSampler(model, seed)
    return {"3d": s.batch_3d(n, noise_mm=(0.0, 0.0), miss_fraction=0.0)}


@torch.no_grad()
def validate(nets: dict[str, HandMeshGCN], model: handmodel.HandModel, val: dict[str, Pair], device: torch.device, pa_count: int = 128) -> dict[str, float]:
    """Errors in mm: GCN mesh MPVPE in the input frame (3D: the frame is known, so this is the
    world error up to nothing; 2D: root-relative), PA-MPVPE of the GCN and of the param mesh,
    and the param joints' MPJPE (3D)."""
    res: dict[str, float] = {}
    for branch, net in nets.items():
        net.eval()
        p = val[branch]
        chunks = []
        for i in range(0, p.x.shape[0], 128):
            sl = slice(i, i + 128)
            chunks.append(net(p.x[sl].to(device), p.vis[sl].to(device), p.extra[sl].to(device)))
        out = {k: torch.cat([c[k] for c in chunks]).cpu() for k in chunks[0]}
        unit = p.unit[:, None, None] * 1000.0
        v = out["vertices"] * unit
        gt = p.vertices * unit
        pv, pj = param_mesh(model, out, p.unit)
        pv, pj = pv * unit, pj * unit
        res[f"{branch}/mpvpe_mm"] = float((v - gt).norm(dim=-1).mean())
        res[f"{branch}/param_mpvpe_mm"] = float((pv - gt).norm(dim=-1).mean())
        if branch == "3d":
            res[f"{branch}/param_mpjpe_mm"] = float((pj - p.joints * unit).norm(dim=-1).mean())
        k = min(pa_count, len(v))
        res[f"{branch}/pa_mpvpe_mm"] = float(np.mean([M.pa_mpvpe(v[i].numpy() / 1000, gt[i].numpy() / 1000) for i in range(k)]))
        res[f"{branch}/param_pa_mpvpe_mm"] = float(np.mean([M.pa_mpvpe(pv[i].numpy() / 1000, gt[i].numpy() / 1000) for i in range(k)]))
        net.train()
    return res


def lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Train the GCN predictor (both branches) on synthetic pairs.")
    ap.add_argument("--config", choices=sorted(CONFIGS), default="small", help="small: CPU (committed weights); full: GPU")
    ap.add_argument("--steps", type=int, help="override the config's number of steps")
    ap.add_argument("--batch", type=int, help="override the config's batch size (per branch)")
    ap.add_argument("--lr", type=float, help="override the config's peak learning rate")
    ap.add_argument("--val-every", type=int, help="override the config's validation interval (steps)")
    ap.add_argument("--lift-steps", type=int, help="override the config's lifter steps")
    ap.add_argument("--lift-pool", type=int, help="override the config's lifter pool size")
    ap.add_argument("--branches", default="3d,2d", help="comma list of branches to train")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy machine)")
    ap.add_argument("--seed", type=int, default=0, help="initialisation seed; training data use fixed seeds per branch")
    ap.add_argument("--val-seed", type=int, default=1, help="validation split seed (never used for training)")
    ap.add_argument("--ckpt-dir", default="runs/gcn_train", help="resumable checkpoints checkpoint_3d.pt / checkpoint_2d.pt")
    ap.add_argument("--ckpt-every", type=int, default=250)
    ap.add_argument("--resume", action="store_true", help="continue from --ckpt")
    ap.add_argument("--out", default=str(WEIGHTS_FILE), help="final weights")
    ap.add_argument("--time-limit", type=float, default=0.0, help="stop (checkpointed, resumable) after this many minutes; 0 = none")
    ap.add_argument("--merge", nargs="+", metavar="WEIGHTS", help="no training: combine the branches of these weight files into --out")
    args = ap.parse_args(argv)
    if args.merge:
        return merge_weights([Path(p) for p in args.merge], Path(args.out))
    cfg = dict(CONFIGS[args.config])
    for k in ("steps", "batch", "lr", "val_every", "lift_steps", "lift_pool"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    branches = [b.strip() for b in args.branches.split(",") if b.strip()]
    for b in branches:
        if b not in BRANCHES:
            ap.error(f"unknown branch {b!r}; expected {BRANCHES}")
    command = "python scripts/train_gcn.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))

    model = handmodel.load("builtin", "right").to(device)
    model_cpu = handmodel.load("builtin", "right")
    hierarchy = MeshHierarchy.load()
    out = Path(args.out)
    results: dict[str, dict] = {}
    if "3d" in branches:
        r = train_mesh(args, cfg, device, model, model_cpu, hierarchy)
        if r is None:
            return 0  # stopped by the time limit; resumable
        results["3d"] = r
    if "2d" in branches:
        r = train_lifter(args, cfg, device, model_cpu)
        if r is None:
            return 0
        results["2d"] = r
    blob = {"format": WEIGHTS_FORMAT, "hierarchy": hierarchy_digest(hierarchy), "configs": {}, "state": {}, "meta": {}}
    if out.is_file():  # keep the branches this run did not train
        old = torch.load(out, map_location="cpu", weights_only=True)
        if old.get("format") == WEIGHTS_FORMAT and old.get("hierarchy") == blob["hierarchy"]:
            blob = old
    for b, r in results.items():
        blob["configs"][b] = r["config"]
        blob["state"][b] = storage_state(r["state"])
        blob["meta"][b] = {"command": command, "config": json.dumps(cfg), "minutes": round(r["minutes"], 1), "validation": json.dumps(r["validation"])}
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(blob, out)
    print(f"weights -> {out} ({out.stat().st_size / 1e6:.1f} MB); " + "; ".join(f"{b}: {r['minutes']:.1f} min, {json.dumps(r['validation'])}" for b, r in results.items()))
    return 0


def merge_weights(paths: list[Path], out: Path) -> int:
    """One weights file from branch files trained separately (later files win per branch), its
    tensors in the storage precision (``--merge W --out W`` converts a float32 file in place)."""
    blob: dict = {"format": WEIGHTS_FORMAT, "hierarchy": None, "configs": {}, "state": {}, "meta": {}}
    for p in paths:
        b = torch.load(p, map_location="cpu", weights_only=True)
        if b.get("format") != WEIGHTS_FORMAT:
            raise SystemExit(f"{p} is not a GCN weights file")
        if blob["hierarchy"] not in (None, b["hierarchy"]):
            raise SystemExit(f"{p} was trained on another mesh hierarchy")
        blob["hierarchy"] = b["hierarchy"]
        for branch in b["state"]:
            blob["configs"][branch] = b["configs"][branch]
            blob["state"][branch] = storage_state(b["state"][branch])
            meta = b.get("meta", {})
            blob["meta"][branch] = meta.get(branch, meta)  # files from single-branch runs keep a flat record
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(blob, out)
    print(f"weights -> {out} ({out.stat().st_size / 1e6:.1f} MB): branches {sorted(blob['state'])}")
    return 0


def train_mesh(args: argparse.Namespace, cfg: dict, device: torch.device, model: handmodel.HandModel, model_cpu: handmodel.HandModel, hierarchy: MeshHierarchy) -> dict | None:
    """The 3D branch's mesh network; returns its config, weights, minutes and last validation."""
    branches = ["3d"]
    nets = {b: build_network(b, hierarchy, model_cpu).to(device) for b in branches}
    opts = {b: torch.optim.Adam(nets[b].parameters(), lr=cfg["lr"]) for b in branches}
    warmup = max(1, cfg["steps"] // 50)
    scheds = {b: torch.optim.lr_scheduler.LambdaLR(opts[b], lambda s: lr_factor(s, cfg["steps"], warmup)) for b in branches}
    samplers = {"3d": PairSampler(model_cpu, TRAIN_SEED_3D + args.seed)}
    edges = mesh_edges(model.faces)
    val = val_batches(model_cpu, args.val_seed, cfg["val_size"])
    start, elapsed, history = 0, 0.0, []
    ckpt = Path(args.ckpt_dir) / "checkpoint_3d.pt"
    if args.resume:
        if not ckpt.is_file():
            raise SystemExit(f"--resume: no checkpoint at {ckpt}")
        c = torch.load(ckpt, map_location="cpu", weights_only=True)
        for b in branches:
            nets[b].load_state_dict(c["nets"][b])
            opts[b].load_state_dict(c["opts"][b])
            scheds[b].load_state_dict(c["scheds"][b])
            samplers[b].g.set_state(c["generators"][b])
        start, elapsed, history = int(c["step"]), float(c["elapsed"]), json.loads(c["history"])
        print(f"resumed at step {start} ({elapsed / 60:.1f} min so far)")

    def save_ckpt(step: int) -> None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        tmp = ckpt.with_suffix(".tmp")
        torch.save({
            "step": step, "elapsed": elapsed, "history": json.dumps(history), "config": json.dumps(cfg),
            "nets": {b: nets[b].state_dict() for b in branches}, "opts": {b: opts[b].state_dict() for b in branches},
            "scheds": {b: scheds[b].state_dict() for b in branches}, "generators": {b: samplers[b].g.get_state() for b in branches},
        }, tmp)
        os.replace(tmp, ckpt)

    bar = tqdm(range(start, cfg["steps"]), initial=start, total=cfg["steps"], desc="gcn 3d", dynamic_ncols=True)
    t_last = time.time()
    last: dict[str, float] = {}
    stopped_early = False
    for step in bar:
        for b in branches:
            s = samplers[b]
            pair = s.batch_3d(cfg["batch"]) if b == "3d" else s.batch_2d(cfg["batch"])[0]
            pair = Pair(**{k: v.to(device) for k, v in pair.__dict__.items()})
            out = nets[b](pair.x, pair.vis, pair.extra)
            terms = losses(model, out, pair, edges)
            loss = sum(WEIGHTS[k] * v for k, v in terms.items())
            opts[b].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(nets[b].parameters(), 1.0)
            opts[b].step()
            scheds[b].step()
            last[f"{b}"] = loss.item()
            last[f"{b}_v_mm"] = terms["vertices"].item() * 1000 * float(pair.unit.mean())
        bar.set_postfix({k: f"{v:.3g}" for k, v in last.items()})
        now = time.time()
        elapsed += now - t_last
        t_last = now
        done = step + 1
        if done % cfg["val_every"] == 0 or done == cfg["steps"]:
            r = validate(nets, model_cpu, val, device)
            r["step"], r["minutes"] = done, elapsed / 60
            history.append(r)
            tqdm.write(json.dumps({k: round(v, 2) for k, v in r.items()}))
            t_last = time.time()
        if done % args.ckpt_every == 0 or done == cfg["steps"]:
            save_ckpt(done)
        if args.time_limit and elapsed / 60 > args.time_limit and done < cfg["steps"]:
            save_ckpt(done)
            tqdm.write(f"time limit reached at step {done}; resume with --resume")
            stopped_early = True
            break
    if stopped_early:
        return None
    return {"config": nets["3d"].cfg.to_dict(), "state": {k: v.detach().cpu() for k, v in nets["3d"].state_dict().items()},
            "minutes": elapsed / 60, "validation": history[-1] if history else {}}


@torch.no_grad()
def validate_lifter(net: KeypointLifter, val: tuple[torch.Tensor, ...], palm: float, device: torch.device) -> dict[str, float]:
    """Root-relative MPJPE and PA-MPJPE (mm) of the lifted keypoints on the validation split."""
    net.eval()
    x, vis, extra, target = val
    pred = net(x.to(device), vis.to(device), extra.to(device)).cpu() * palm
    gt = target * palm
    net.train()
    return {
        "2d/lift_mpjpe_mm": float((pred - gt).norm(dim=-1).mean() * 1000),
        "2d/lift_pa_mpjpe_mm": float(np.mean([M.pa_mpjpe(pred[i], gt[i]) for i in range(min(256, len(gt)))])),
    }


def train_lifter(args: argparse.Namespace, cfg: dict, device: torch.device, model_cpu: handmodel.HandModel) -> dict | None:
    """The 2D branch's keypoint lifter, on a pool of hands re-posed, re-viewed and re-noised per
    batch; returns its config, weights, minutes and last validation."""
    sampler = PairSampler(model_cpu, TRAIN_SEED_2D + args.seed)
    pool = sampler.joint_pool(cfg["lift_pool"])
    vs = PairSampler(model_cpu, args.val_seed + 500)
    val = vs.lift_batch(vs.joint_pool(cfg["val_size"]), mode="scene", miss_fraction=0.0, noise_px=3.0)
    torch.manual_seed(args.seed + 1)
    net = KeypointLifter(LifterConfig()).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg["lift_lr"])
    steps = cfg["lift_steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, max(1, steps // 50)))
    ckpt = Path(args.ckpt_dir) / "checkpoint_2d.pt"
    start, elapsed, history = 0, 0.0, []
    if args.resume and ckpt.is_file():
        c = torch.load(ckpt, map_location="cpu", weights_only=True)
        net.load_state_dict(c["net"])
        opt.load_state_dict(c["opt"])
        sched.load_state_dict(c["sched"])
        sampler.g.set_state(c["generator"])
        start, elapsed, history = int(c["step"]), float(c["elapsed"]), json.loads(c["history"])
        print(f"lifter resumed at step {start}")

    def save_ckpt(step: int) -> None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"step": step, "elapsed": elapsed, "history": json.dumps(history), "net": net.state_dict(), "opt": opt.state_dict(),
                    "sched": sched.state_dict(), "generator": sampler.g.get_state()}, tmp)
        os.replace(tmp, ckpt)

    val_every = max(1, cfg["val_every"] * 4)
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="gcn 2d lifter", dynamic_ncols=True)
    t_last = time.time()
    for step in bar:
        idx = torch.randint(0, len(pool), (cfg["lift_batch"],), generator=sampler.g)
        x, vis, extra, target = (t.to(device) for t in sampler.lift_batch(pool[idx]))
        pred = net(x, vis, extra)
        loss = (pred - target).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        now = time.time()
        elapsed += now - t_last
        t_last = now
        bar.set_postfix(l1_mm=f"{loss.item() * sampler.palm_size * 1000:.2f}")
        done = step + 1
        if done % val_every == 0 or done == steps:
            r = validate_lifter(net, val, sampler.palm_size, device)
            r["step"], r["minutes"] = done, elapsed / 60
            history.append(r)
            tqdm.write(json.dumps({k: round(v, 2) for k, v in r.items()}))
            t_last = time.time()
        if done % (args.ckpt_every * 4) == 0 or done == steps:
            save_ckpt(done)
        if args.time_limit and elapsed / 60 > args.time_limit and done < steps:
            save_ckpt(done)
            tqdm.write(f"time limit reached at step {done}; resume with --resume")
            return None
    return {"config": net.cfg.to_dict(), "state": {k: v.detach().cpu() for k, v in net.state_dict().items()},
            "minutes": elapsed / 60, "validation": history[-1] if history else {}}


if __name__ == "__main__":
    sys.exit(main())
