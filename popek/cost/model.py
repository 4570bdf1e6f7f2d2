"""The cost model: a pure function from (events, guest instructions, profile) to modelled cycles.

    cycles = guest_instructions x profile CPI  +  sum over priced events of count x price(kind, name)

Every price is what one event *adds* to the run on the profile's processor (the guest's own instructions are
already in the first term). ``info`` events (popek.events) cost nothing by definition; any other event the
profile cannot price is listed in ``unpriced`` and left out of the total, never counted as zero silently.
The model counts events exactly; it prices them from the literature; it does not model caches, pipelines,
TLB refills or the indirect costs of an exit (cold caches afterwards).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from popek import events as vocabulary
from popek.cost.profile import Profile

INSTRUCTIONS = "instructions"


@dataclass(frozen=True)
class Line:
    kind: str
    name: str
    count: int
    each: float             # cycles per event
    cycles: float
    assumed: bool = False   # some of its price is an assumed number, not a published one


@dataclass(frozen=True)
class Cost:
    profile: str
    cycles: float
    breakdown: dict[str, float]             # "instructions" and each priced kind -> cycles
    unpriced: list[str]                     # "kind: name" an event the profile cannot price
    lines: list[Line] = field(default_factory=list)

    @property
    def assumed_share(self) -> float:
        """The fraction of the total that comes from assumed prices (0 when everything is published)."""
        return sum(line.cycles for line in self.lines if line.assumed) / self.cycles if self.cycles else 0.0

    def summary(self, top: int = 4) -> str:
        """Two lines for people: the total with its provenance, and the largest contributions."""
        biggest = sorted(self.breakdown.items(), key=lambda kv: -kv[1])[:top]
        parts = ", ".join(f"{k} {v:,.0f}" for k, v in biggest)
        text = (f"modelled: {self.cycles:,.0f} cycles on profile {self.profile} "
                f"({self.assumed_share:.0%} from assumed prices; `popek profiles {self.profile}` lists every "
                f"number and its source)\n  largest: {parts}")
        if self.unpriced:
            text += f"\n  not priced by this profile (left out of the total): {', '.join(self.unpriced)}"
        return text

    def document(self) -> dict:
        """The run document's ``profile`` field (DESIGN §3.4)."""
        return {"name": self.profile, "breakdown": {k: round(v, 1) for k, v in self.breakdown.items()},
                "unpriced": self.unpriced}


def price_events(events: dict[str, dict[str, int]], guest_instructions: int, profile: Profile) -> Cost:
    """Modelled cycles of one run (see the module docstring)."""
    base = guest_instructions * profile.instructions.cycles
    breakdown = {INSTRUCTIONS: base}
    lines = [Line(INSTRUCTIONS, "", guest_instructions, profile.instructions.cycles, base,
                  profile.instructions.is_assumed)]
    unpriced = []
    for kind_name, names in events.items():
        kind = vocabulary.KINDS.get(kind_name)
        for name, count in names.items():
            if kind is not None and kind.role_of(name) == vocabulary.INFO:
                continue
            each = profile.price(kind_name, name) if kind is not None and kind.knows(name) else None
            assumed = each is not None and profile.is_assumed(kind_name, name)
            if each is not None and kind.includes and kind.family and kind.family.contains(name):
                routine = profile.price(kind.includes, name)
                each = None if routine is None else each + routine
                assumed = assumed or profile.is_assumed(kind.includes, name)
            if each is None:
                unpriced.append(f"{kind_name}: {name}")
                continue
            cycles = count * each
            breakdown[kind_name] = breakdown.get(kind_name, 0.0) + cycles
            lines.append(Line(kind_name, name, count, each, cycles, assumed))
    return Cost(profile.name, sum(breakdown.values()), breakdown, sorted(unpriced), lines)
