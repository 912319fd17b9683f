"""Train the GCN predictor on synthetic keypoint -> mesh pairs drawn on the fly from the hand model.

    python scripts/train_gcn.py --config small          # CPU, the committed weights
    python scripts/train_gcn.py --config full --device cuda

Both branches (3D keypoints, 2D keypoints of one view) train in one loop, one batch each per step.
Losses per branch, in the branch's normalised frame: L1 on the GCN vertices, an edge-length term,
L1 of the hand model driven by the predicted parameters against the true vertices and joints, a
consistency term of that model mesh against the (detached) GCN mesh, and small direct terms on
betas, hand_pose and the wrist rotation (they disambiguate what the mesh alone leaves free).

Checkpoints (``--ckpt``, every ``--ckpt-every`` steps and at the end) hold the networks, optimisers,
schedules and the samplers' generator states, so ``--resume`` continues the same run. The
validation split uses its own seed (``--val-seed``); evaluation (scripts/eval_gcn.py) another one.
At the end the weights go to ``--out`` with the configs, the command and the validation numbers.
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
from networks.hierarchy import MeshHierarchy  # noqa: E402
from networks.predictor import BRANCHES, WEIGHTS_FILE, WEIGHTS_FORMAT, build_network, hierarchy_digest  # noqa: E402
from networks.synthetic_pairs import Pair, PairSampler  # noqa: E402

CONFIGS = {
    "small": {"steps": 2200, "batch": 32, "lr": 2e-3, "val_every": 200, "val_size": 256},
    "full": {"steps": 60000, "batch": 256, "lr": 1e-3, "val_every": 2000, "val_size": 2048},
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
    """Held-out validation pairs: clean 3D keypoints; one scene-like view with 3 px noise."""
    s = PairSampler(model, seed)
    p3 = s.batch_3d(n, noise_mm=(0.0, 0.0), miss_fraction=0.0)
    p2, _ = s.batch_2d(n, mode="scene", noise_px=(3.0, 3.0), miss_fraction=0.0)
    return {"3d": p3, "2d": p2}


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
    ap.add_argument("--branches", default="3d,2d", help="comma list of branches to train")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy machine)")
    ap.add_argument("--seed", type=int, default=0, help="initialisation seed; training data use fixed seeds per branch")
    ap.add_argument("--val-seed", type=int, default=1, help="validation split seed (never used for training)")
    ap.add_argument("--ckpt", default="runs/gcn_train/checkpoint.pt", help="resumable checkpoint")
    ap.add_argument("--ckpt-every", type=int, default=250)
    ap.add_argument("--resume", action="store_true", help="continue from --ckpt")
    ap.add_argument("--out", default=str(WEIGHTS_FILE), help="final weights")
    ap.add_argument("--time-limit", type=float, default=0.0, help="stop (checkpointed, resumable) after this many minutes; 0 = none")
    args = ap.parse_args(argv)
    cfg = dict(CONFIGS[args.config])
    for k in ("steps", "batch", "lr", "val_every"):
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
    nets = {b: build_network(b, hierarchy, model_cpu).to(device) for b in branches}
    opts = {b: torch.optim.Adam(nets[b].parameters(), lr=cfg["lr"]) for b in branches}
    warmup = max(1, cfg["steps"] // 50)
    scheds = {b: torch.optim.lr_scheduler.LambdaLR(opts[b], lambda s: lr_factor(s, cfg["steps"], warmup)) for b in branches}
    samplers = {"3d": PairSampler(model_cpu, TRAIN_SEED_3D + args.seed), "2d": PairSampler(model_cpu, TRAIN_SEED_2D + args.seed)}
    edges = mesh_edges(model.faces)
    val = val_batches(model_cpu, args.val_seed, cfg["val_size"])
    start, elapsed, history = 0, 0.0, []
    ckpt = Path(args.ckpt)
    if args.resume:
        if not ckpt.is_file():
            ap.error(f"--resume: no checkpoint at {ckpt}")
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

    bar = tqdm(range(start, cfg["steps"]), initial=start, total=cfg["steps"], desc="gcn", dynamic_ncols=True)
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
            r = validate(nets, model_cpu if device.type == "cpu" else model, val, device)
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
        return 0

    final = history[-1] if history else {}
    blob = {
        "format": WEIGHTS_FORMAT,
        "hierarchy": hierarchy_digest(hierarchy),
        "configs": {b: nets[b].cfg.to_dict() for b in branches},
        "state": {b: {k: v.detach().cpu() for k, v in nets[b].state_dict().items()} for b in branches},
        "meta": {"command": command, "config": json.dumps(cfg), "steps": cfg["steps"], "minutes": round(elapsed / 60, 1), "validation": json.dumps(final)},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(blob, out)
    print(f"weights -> {out} ({out.stat().st_size / 1e6:.1f} MB) after {elapsed / 60:.1f} min; validation {json.dumps(final)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
