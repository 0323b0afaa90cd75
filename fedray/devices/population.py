"""The run's device population from the ``devices`` config section."""
from __future__ import annotations

import dataclasses
from typing import Mapping

from fedray.errors import ConfigError
from fedray.params import build

__all__ = ["population", "profiles"]


# the fields a named population sets: each must stay at its default (or equal the population's value)
NAMED_FIELDS = ("tiers", "reference_flops", "link", "bw_sigma", "link_means", "download_bps_range", "upload_bps_range")


def _plain(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v


def named(dev, num_clients: int | None = None):
    """The named population ``dev.population`` (:data:`fedray.devices.profile.POPULATIONS`),
    checked against the section's other fields and the run's ``num_clients``."""
    from fedray.devices.profile import POPULATIONS

    name = dev.population
    if name not in POPULATIONS:
        raise ConfigError("devices.population", f"unknown population {name!r}; choose from: {', '.join(POPULATIONS)} (or null)")
    spec = POPULATIONS[name]()
    defaults = {f.name: f.default for f in dataclasses.fields(dev)}
    for fld in NAMED_FIELDS:
        v = _plain(getattr(dev, fld))
        if v != _plain(defaults[fld]) and v != _plain(getattr(spec, fld)):
            raise ConfigError(f"devices.{fld}", f"conflicts with devices.population: {name}, which sets it (remove devices.{fld})")
    if num_clients is not None:
        spec.check_size(int(num_clients), name)
    return spec


def population(dev, num_clients: int | None = None):
    """The :class:`fedray.devices.profile.PopulationSpec` a ``devices`` section describes
    (a named ``devices.population`` or tiers and links; ``num_clients``: checked against a named one)."""
    from fedray.devices.profile import TIER_PRESETS, PopulationSpec, TierSpec

    if dev.population:
        return named(dev, num_clients)
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

    return build_population(cfg.data.num_clients, population(cfg.devices, cfg.data.num_clients), seeding.derive(cfg.seed, "devices"))
