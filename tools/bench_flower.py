"""Peer comparison: workload W in fedray, in a plain PyTorch loop and in Flower's simulation engine.

The fedray and plain-loop sides are those of ``bench_overhead.py`` (``fedray_round_s``,
``plain_fedavg``, ``workload_w``), so all three share one definition of W. The Flower side
(``_flower_side.py``) runs in its own virtual environment, since Flower pins its own Ray:
created here when missing (``--flower-venv``, default .flwr-venv in the repository) with
``pip install "flwr[simulation]" torch==<this torch>``. It gets from this process the
arrays fedray's ``prepare`` made (the same 80/20 split of digits, the same client index
arrays, fedray's initial parameters) and builds the model with fedray's factory and
trains each client with fedray's ``local_train``: what differs is the federation
machinery (selection, transport, aggregation, actors). Flower gets the same CPU budget:
a Ray of ``--actors`` CPUs with one CPU per client actor.

Steady-state seconds per round, as ``bench_overhead.py``: the mean over the rounds after
``--warmup`` (wall time from the end of the warm-up to the end of the run, divided by the
rounds); Flower's round ends are stamped in its ``evaluate_fn``. Repetitions alternate
fedray / plain / Flower in one run; the ratios printed are medians over repetitions.

    python tools/bench_flower.py --reps 3 --rounds 60

Nothing in fedray, its tests or CI uses Flower or this virtual environment.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)


def flower_python(venv: str) -> str:
    """The Flower venv's python, creating the venv (and installing Flower) when missing."""
    import torch

    py = os.path.join(venv, "bin", "python")
    check = [py, "-c", "import flwr, ray, torch"]
    if os.path.exists(py) and subprocess.run(check, capture_output=True).returncode == 0:
        return py
    print(f"creating Flower's virtual environment in {venv} ...", flush=True)
    subprocess.run(["python3", "-m", "venv", venv], check=True)
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"  # the same torch as fedray's side
    subprocess.run([py, "-m", "pip", "install", "-q", "flwr[simulation]", torch_pin], check=True)
    subprocess.run(check, check=True)
    return py


def flower_versions(py: str) -> str:
    out = subprocess.run([py, "-c", "import flwr, ray, torch; print(flwr.__version__, ray.__version__, "
                                    "torch.__version__)"], capture_output=True, text=True, check=True)
    flwr_v, ray_v, torch_v = out.stdout.split()
    return f"flwr {flwr_v}, ray {ray_v}, torch {torch_v}"


def write_spec(cfg, actors: int, tmp: str) -> str:
    """Hand workload W, as fedray prepares it, to the Flower side: arrays (.npz) and a spec (.json)."""
    from fedray.runtime.setup import prepare

    setup = prepare(cfg)
    ds, parts = setup.dataset, [np.asarray(p) for p in setup.partitions]
    arrays = os.path.join(tmp, "w.npz")
    np.savez(arrays, x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test, y_test=ds.y_test,
             part_index=np.concatenate(parts), part_offsets=np.cumsum([0] + [len(p) for p in parts]),
             **{f"p:{k}": v for k, v in setup.params.items()})
    t, s = cfg.train, cfg.server
    spec = {"arrays": arrays, "seed": cfg.seed, "rounds": s.rounds, "clients_per_round": s.clients_per_round,
            "num_clients": len(parts), "actors": actors, "torch_threads": cfg.cluster.torch_threads,
            "model": cfg.model.name, "model_options": dict(cfg.model.options),
            "input_shape": list(ds.input_shape), "num_classes": ds.num_classes,
            "train": {"optimizer": t.optimizer, "lr": t.lr, "momentum": t.momentum,
                      "weight_decay": t.weight_decay, "batch_size": t.batch_size,
                      "local_epochs": t.local_epochs, "local_steps": t.local_steps}}
    path = os.path.join(tmp, "spec.json")
    with open(path, "w") as f:
        json.dump(spec, f)
    return path


def flower_round_s(py: str, spec: str, warmup: int, tmp: str) -> tuple[float, float, float, float]:
    """(mean seconds per round after warm-up, and per round over the same rounds the clients'
    seconds in the ClientApp and in ``local_train``, summed over the round's clients; final accuracy)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "VIRTUAL_ENV")}
    env["PYTHONPATH"] = ROOT  # fedray's model factory and local_train (torch and numpy only)
    log = os.path.join(tmp, "flower.log")
    with open(log, "w") as f:
        proc = subprocess.run([py, os.path.join(HERE, "_flower_side.py"), spec], env=env, cwd=tmp,
                              stdout=subprocess.PIPE, stderr=f, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("FLOWER_RESULT ")]
    if proc.returncode or not lines:
        with open(log) as f:
            sys.exit(f"Flower side failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{f.read()[-5000:]}")
    out = json.loads(lines[-1].split(" ", 1)[1])
    t = out["stamps"]  # t[r]: end of round r (t[0]: before round 1)
    rounds = len(t) - 1
    # the same rounds as fedray's and the plain loop's measure: 0-based rounds warmup+1 .. rounds-1
    steady = (t[rounds] - t[warmup + 1]) / (rounds - 1 - warmup)
    per_round = (float(np.mean(out[k][warmup + 1:])) for k in ("train_s", "fit_s"))
    return (float(steady), *per_round, out["accuracy"][-1])


def steal_ticks() -> int:
    """The host's CPU steal so far (``/proc/stat``, all CPUs), in clock ticks."""
    with open("/proc/stat") as f:
        return int(f.readline().split()[8])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=150)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions (medians)")
    ap.add_argument("--flower-venv", default=os.path.join(ROOT, ".flwr-venv"), help="Flower's virtual environment (made if missing)")
    a = ap.parse_args()
    if a.rounds < a.warmup + 3:
        ap.error("--rounds must exceed --warmup by at least 3")
    py = flower_python(a.flower_venv)
    versions = flower_versions(py)

    import ray

    from bench_overhead import fedray_round_s
    from fedray.config import from_dict
    from plain_fedavg import plain_fedavg, workload_w

    base = workload_w(a.rounds, **{"cluster.num_client_actors": a.actors})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        spec = write_spec(from_dict(base), a.actors, tmp)
        ray.init(address="local", include_dashboard=False, logging_level="ERROR")  # fedray's Ray, started once, excluded
        steal0, load0 = steal_ticks(), os.getloadavg()[0]
        for _ in range(a.reps):  # interleaved, so all sides see the same machine conditions
            fed, acc_f = fedray_round_s(base, a.warmup)
            plain = plain_fedavg(from_dict(base))
            pl, acc_p = float(np.mean(plain["round_s"][a.warmup + 1:])), plain["final_accuracy"]
            fl, fl_app, fl_fit, acc_fl = flower_round_s(py, spec, a.warmup, tmp)
            rows.append((fed, pl, fl, fl_app, fl_fit, fed / fl, fed / pl))
            print(f"  rep {len(rows)}: fedray {fed * 1e3:7.2f}, plain {pl * 1e3:7.2f}, Flower {fl * 1e3:7.2f} "
                  f"ms/round; fedray/Flower {fed / fl:.3f}, fedray/plain {fed / pl:.3f}", flush=True)
        steal = steal_ticks() - steal0
    fed, pl, fl, fl_app, fl_fit, r_fl, r_pl = (float(np.median([r[i] for r in rows])) for i in range(7))
    print(f"fedray FedAvg ({a.actors} client actors)       : {fed * 1e3:8.2f} ms/round (final accuracy {acc_f:.4f})")
    print(f"plain PyTorch loop                    : {pl * 1e3:8.2f} ms/round (final accuracy {acc_p:.4f})")
    print(f"Flower simulation ({a.actors} client actors)   : {fl * 1e3:8.2f} ms/round (final accuracy {acc_fl:.4f})")
    print(f"  of which its {base['server']['clients_per_round']} ClientApp calls, summed: {fl_app * 1e3:.2f} ms "
          f"({fl_fit * 1e3:.2f} ms in local_train)")
    print(f"ratio fedray / Flower                 : {r_fl:8.3f}  (median of {a.reps})")
    print(f"ratio fedray / plain                  : {r_pl:8.3f}  (median of {a.reps})")
    print(f"Flower side: {versions}; {a.rounds} rounds, steady state after round {a.warmup + 1}; "
          f"load average {load0:.2f} -> {os.getloadavg()[0]:.2f}, {steal} ticks of CPU steal")


if __name__ == "__main__":
    main()
