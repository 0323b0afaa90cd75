"""fedray from Python, as in a notebook: load a config, run it, look at the results, compare methods.

    python examples/python_api.py [OUT_DIR]     (a few seconds of training; default OUT_DIR: runs)

Each step is one notebook cell.
"""
import sys
from pathlib import Path

import fedray

out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs")

# 1. the quickstart config with a tiny budget: overrides as on the command line (--set), or a dict
cfg = fedray.load_config("configs/quickstart.yaml", overrides={
    "experiment": "python_api", "data.num_clients": 20, "server.rounds": 3, "server.clients_per_round": 5,
    "server.eval_every": 1, "train.local_epochs": 1, "runtime.out_dir": str(out)})

# 2. one run: a Result with the summary, the metrics table, the model and the paths
res = fedray.run(cfg)
print(f"final accuracy {res.summary['final_accuracy']:.3f} after {res.summary['rounds']} rounds "
      f"({res.summary['status']}); run folder {res.run_dir}, TensorBoard {res.tb_dir}")
evals = res.metrics.query("event == 'eval'")[["version", "virtual_s", "accuracy", "loss"]]
print(evals.to_string(index=False))
model = res.model()  # the final global model, a torch.nn.Module
print(type(model).__name__, sum(p.numel() for p in model.parameters()), "parameters")

# 3. a comparison from a config dict written here (compare: section), as `fedray compare` does
import yaml  # noqa: E402

spec = out / "python_api_compare.yaml"
spec.write_text(yaml.safe_dump({**yaml.safe_load(res.config_path.read_text()), "experiment": "python_api_compare",
                                "compare": {"methods": ["fedavg", {"name": "fedprox", "mu": 0.01}], "seeds": [0]}}))
cmp = fedray.compare(spec)
for r in cmp["results"]:
    print(f"{r.summary['method']}: final accuracy {r.summary['final_accuracy']:.3f}")
print(f"report: {cmp['report']['markdown']}")
