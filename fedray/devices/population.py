"""The run's device population from the ``devices`` config section."""
from __future__ import annotations

from typing import Mapping

from fedray.errors import ConfigError
from fedray.params import build

__all__ = ["population", "profiles"]


def population(dev):
    """The :class:`fedray.devices.profile.PopulationSpec` a ``devices`` section describes."""
    from fedray.devices.profile import TIER_PRESETS, PopulationSpec, TierSpec

    if isinstance(dev.tiers, str):
        if dev.tiers not in TIER_PRESETS:
            raise ConfigError("devices.tiers", f"unknown preset {dev.tiers!r}; choose from: {', '.join(TIER_PRESETS)} or a list")
        tiers = TIER_PRESETS[dev.tiers]()
    elif isinstance(dev.tiers, (list, tuple)) and dev.tiers:
        tiers = []
        for i, t in enumerate(dev.tiers):
            if isinstance(t, TierSpec):
                tiers.append(t)
                continue
            if not isinstance(t, Mapping) or "name" not in t:
                raise ConfigError(f"devices.tiers[{i}]", "must be a mapping with at least name and fraction")
            tiers.append(build(TierSpec, t, f"devices.tiers[{i}]"))
        tiers = tuple(tiers)
    else:
        raise ConfigError("devices.tiers", f"must be a preset name or a non-empty list of tiers, got {dev.tiers!r}")
    return PopulationSpec(
        reference_flops=dev.reference_flops, tiers=tiers, link=dev.link, bw_sigma=dev.bw_sigma,
        link_means=dev.link_means, download_bps_range=tuple(dev.download_bps_range),
        upload_bps_range=tuple(dev.upload_bps_range), cpu_load=dev.cpu_load, load_sigma=dev.load_sigma,
        dropout_prob=dev.dropout_prob, availability=dev.availability,
        availability_cycle_s=dev.availability_cycle_s, trace_path=dev.trace_path)


def profiles(cfg):
    """The run's device profiles: one per client, drawn from ``devices`` with the run's seed.
    The loop and every method that plans by device (HeteroFL, CA-HFP) use this one draw."""
    from fedray import seeding
    from fedray.devices.columns import build_population

    return build_population(cfg.data.num_clients, population(cfg.devices), seeding.derive(cfg.seed, "devices"))
