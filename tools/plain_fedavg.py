"""A plain single-process PyTorch FedAvg loop: the reference fedray is checked against.

It shares only the data (the same split and partition, from :mod:`fedray.data`)
and the model definition with fedray; selection, local training and averaging
are written out here independently, in ~40 lines of ordinary PyTorch.

    python tools/plain_fedavg.py --rounds 150
"""
from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
from torch import nn


def workload_w(rounds: int = 150, **over) -> dict:
    """Workload W of the foundation issue as a config mapping."""
    cfg = {
        "experiment": "workload_w", "seed": 0, "method": {"name": "fedavg"},
        "data": {"name": "digits", "test_fraction": 0.2, "num_clients": 100, "partition": {"kind": "iid"}},
        "model": {"name": "mlp", "options": {"hidden": [128]}},
        "train": {"local_epochs": 1, "batch_size": 16, "optimizer": "sgd", "lr": 0.05},
        "server": {"rounds": rounds, "clients_per_round": 10, "eval_every": 1},
        "runtime": {"progress": False},
    }
    for k, v in over.items():
        node = cfg
        *path, last = k.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = v
    return cfg


def plain_fedavg(cfg, *, seed: int = 1234, threads: int = 1) -> dict:
    """Run FedAvg as a plain loop on the data/partition fedray would use for ``cfg``.

    Returns final accuracy and per-round wall seconds.
    """
    from fedray.runtime.setup import prepare

    torch.set_num_threads(threads)
    setup = prepare(cfg)
    ds, parts = setup.dataset, setup.partitions
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    from fedray.models import build_model

    model = build_model(cfg.model.name, ds.input_shape, ds.num_classes, options=cfg.model.options)
    x_tr, y_tr = torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train)
    x_te, y_te = torch.from_numpy(ds.x_test), torch.from_numpy(ds.y_test)
    tc, sc = cfg.train, cfg.server
    loss_fn = nn.CrossEntropyLoss()
    round_s, acc = [], float("nan")
    for r in range(sc.rounds):
        t0 = time.perf_counter()
        chosen = rng.choice(len(parts), size=sc.clients_per_round, replace=False)
        global_state = copy.deepcopy(model.state_dict())
        total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in global_state.items()}
        n_sum = 0
        for c in chosen:
            model.load_state_dict(global_state)
            opt = torch.optim.SGD(model.parameters(), lr=tc.lr, momentum=tc.momentum)
            idx = parts[c]
            for _ in range(tc.local_epochs):
                order = idx[rng.permutation(len(idx))]
                for s in range(0, len(order), tc.batch_size):
                    b = order[s:s + tc.batch_size]
                    opt.zero_grad()
                    loss_fn(model(x_tr[b]), y_tr[b]).backward()
                    opt.step()
            n = len(idx)
            n_sum += n
            for k, v in model.state_dict().items():
                total[k] += n * v.double()
        model.load_state_dict({k: (v / n_sum).to(global_state[k].dtype) for k, v in total.items()})
        if (r + 1) % sc.eval_every == 0 or r + 1 == sc.rounds:
            with torch.no_grad():
                acc = float((model(x_te).argmax(1) == y_te).float().mean())
        round_s.append(time.perf_counter() - t0)
    return {"final_accuracy": acc, "round_s": round_s}


def main() -> None:
    from fedray.config import from_dict

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=150)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="also run fedray on workload W with these seeds and compare mean final accuracy")
    ap.add_argument("--fedray", action="store_true", help="run fedray too (needs Ray; starts it once)")
    a = ap.parse_args()
    plain, fed = [], []
    for seed in a.seeds:
        cfg = from_dict(workload_w(a.rounds, seed=seed, **{"runtime.tensorboard": False,
                                                           "runtime.out_dir": "runs/plain_check"}))
        out = plain_fedavg(cfg, seed=1000 + seed)
        plain.append(out["final_accuracy"])
        line = f"seed {seed}: plain loop {out['final_accuracy']:.4f} " \
               f"({np.median(out['round_s'][10:]) * 1e3:.2f} ms/round)"
        if a.fedray:
            from fedray.runtime.runner import run

            fed.append(run(cfg)["final_accuracy"])
            line += f", fedray {fed[-1]:.4f}"
        print(line, flush=True)
    print(f"mean final accuracy: plain loop {np.mean(plain):.4f}" +
          (f", fedray {np.mean(fed):.4f}, difference {abs(np.mean(fed) - np.mean(plain)) * 100:.2f} points"
           if fed else ""))


if __name__ == "__main__":
    main()
