"""What checkpoints and resuming cost: checkpoint size and save time, and the resume overhead.

    python tools/bench_checkpoint.py [--model mlp|vgg11] [--rounds 60] [--every 10] [--method fedavg]

``mlp`` is the quickstart (digits, 100 clients). ``vgg11`` runs VGG-11 (9.2 M parameters) on
CIFAR-10-shaped data: this script writes a small random CIFAR-10 folder in the real format (no
download), since a checkpoint's size and save time depend on the model and the state, not on
the pixels. Three runs in one process, measured in this run:

1. straight: ``--rounds`` aggregations with a checkpoint every ``--every`` (each save timed);
2. the same run without checkpoints (``runtime.checkpoint_every=0``): the checkpoints' share of
   the wall time;
3. interrupted after half the rounds, then resumed: the resumed run's setup and wall time against
   the straight run's, and that both end with the same model bytes.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from datafiles import write_cifar10  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("mlp", "vgg11"), default="mlp")
    ap.add_argument("--method", default="fedavg")
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="a.b=v")
    a = ap.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    from fedray import config as C
    from fedray.errors import Interrupted
    from fedray.runtime import checkpoint, progress
    from fedray.runtime.runner import Runner

    out = Path(tempfile.mkdtemp(prefix="fedray-ckpt-"))
    sets = [f"method.name={a.method}", f"server.rounds={a.rounds}", "server.eval_every=10", "runtime.progress=false",
            "runtime.tensorboard=false", "server.target_accuracy=null"]
    if a.model == "vgg11":
        write_cifar10(out / "cifar", per_batch=100)
        sets += ["data.name=cifar10", f"data.root={out / 'cifar'}", "data.num_clients=20", "model.name=vgg11",
                 "model.options={}", "train.local_epochs=1", "train.batch_size=32", "server.clients_per_round=4"]
    base = C.load(os.path.join(HERE, "..", "configs", "quickstart.yaml"), sets + a.overrides)

    def cfg(name, *more):
        return C.from_dict(C.to_dict(base), [f"runtime.out_dir={out / name}", *more])

    saves: list[tuple[float, int]] = []
    save = checkpoint.save

    def timed(where, blob):
        t = time.perf_counter()
        n = save(where, blob)
        saves.append((time.perf_counter() - t, n))
        return n

    checkpoint.save = timed
    dumps = checkpoint.dumps
    encode: list[float] = []

    def timed_dumps(state):
        t = time.perf_counter()
        blob = dumps(state)
        encode.append(time.perf_counter() - t)
        return blob

    checkpoint.dumps = timed_dumps
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    try:
        t = time.perf_counter()
        straight = Runner(cfg("straight", f"runtime.checkpoint_every={a.every}")).run()
        straight_wall = time.perf_counter() - t
        ckpt = list(saves)
        t = time.perf_counter()
        bare = Runner(cfg("bare", "runtime.checkpoint_every=0")).run()
        bare_wall = time.perf_counter() - t
        half = a.rounds // 2
        call = progress.Progress.__call__

        def stop(self, res, t_, rnd):
            call(self, res, t_, rnd)
            if res["version"] >= half:
                self.run.stopping = self.run.stopping or "SIGTERM"

        progress.Progress.__call__ = stop
        c = cfg("resumed", f"runtime.checkpoint_every={a.every}")
        t = time.perf_counter()
        try:
            Runner(c).run()
        except Interrupted:
            pass
        first_wall = time.perf_counter() - t
        progress.Progress.__call__ = call
        t = time.perf_counter()
        resumed = Runner(c, resume=True).run()
        second_wall = time.perf_counter() - t
    finally:
        ray.shutdown()
    sec = [s for s, _ in ckpt]
    size = ckpt[-1][1] if ckpt else 0
    print(f"{a.model} / {a.method}, {a.rounds} aggregations, a checkpoint every {a.every}")
    print(f"checkpoint: {size / 2**20:.2f} MiB; save {1e3 * sum(sec) / max(len(sec), 1):.1f} ms on average "
          f"(+ {1e3 * sum(encode[:len(sec) + 1]) / max(len(sec) + 1, 1):.1f} ms to snapshot the state) over {len(sec)}")
    print(f"wall: {straight['wall_s']:.2f} s with checkpoints, {bare['wall_s']:.2f} s without "
          f"(x{straight['wall_s'] / bare['wall_s']:.3f}); process time {straight_wall:.1f} s vs {bare_wall:.1f} s")
    print(f"interrupted at {half} + resumed: {first_wall + second_wall:.1f} s in all vs {straight_wall:.1f} s straight "
          f"(x{(first_wall + second_wall) / straight_wall:.3f}); resumed run's setup {resumed['setup_s']:.1f} s; "
          f"same model: {resumed['model_sha256'] == straight['model_sha256']}")
    return 0 if resumed["model_sha256"] == straight["model_sha256"] else 1


if __name__ == "__main__":
    sys.exit(main())
