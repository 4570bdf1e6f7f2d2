"""popek.cost: modelled cycles of a run, from its events and a processor's cost profile.

``profile`` loads and validates the TOML profiles (popek/cost/profiles/), ``model`` is the pure function
from (events, guest instructions, profile) to cycles, and ``apply`` fills a run result's ``modelled_cycles``
and ``profile`` with it.
"""
from __future__ import annotations

from popek.cost.model import Cost, price_events
from popek.cost.profile import Profile, load

DEFAULT = "modern"


def apply(result, profile: str | Profile = DEFAULT):
    """Price ``result`` (a RunResult) on ``profile`` (a name, a path or a loaded Profile), in place."""
    loaded = load(profile) if isinstance(profile, str) else profile
    cost = price_events(result.events, result.guest_instructions, loaded)
    result.modelled_cycles = round(cost.cycles)
    result.profile = cost.document()
    result.extra["cost"] = cost
    return result


__all__ = ["DEFAULT", "Cost", "Profile", "apply", "load", "price_events"]
