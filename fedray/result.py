"""What :func:`fedray.run` returns: a finished run's summary and its folder, read back lazily."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["Result"]


@dataclass(frozen=True)
class Result:
    """One finished run: its ``summary`` (``summary.json``) and its folder."""

    summary: dict
    run_dir: Path

    @property
    def config_path(self) -> Path:
        return self.run_dir / "config.yaml"

    @property
    def tb_dir(self) -> Path:
        return self.run_dir / "tb"

    @property
    def metrics(self):
        """Every event row (``metrics.parquet``) as a pandas DataFrame."""
        import pandas as pd

        return pd.read_parquet(self.run_dir / "metrics.parquet")

    @property
    def config(self):
        from fedray import config

        return config.load(self.config_path)

    def model(self):
        """The final global model as a ``torch.nn.Module`` (built from the run's config, weights from ``model.npz``)."""
        import numpy as np
        import torch

        from fedray.data.datasets import load_dataset
        from fedray.models.factory import build_model

        cfg = self.config
        d = cfg.data
        ds = load_dataset(d.name, root=d.root, download=False, seed=cfg.seed, test_fraction=d.test_fraction,
                          options=d.options)
        net = build_model(cfg.model.name, ds.input_shape, ds.num_classes, options=cfg.model.options)
        with np.load(self.run_dir / "model.npz") as z:
            net.load_state_dict({k: torch.from_numpy(np.array(z[k])) for k in z.files})
        return net.eval()
