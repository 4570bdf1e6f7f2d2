"""popek.cost: the profiles load and source every number; a run's modelled cycles are the sum of its priced
events; a bad profile is a one-line error with its file and line."""
from __future__ import annotations

from pathlib import Path

import pytest

from popek.cli import main
from popek.cost import load, price_events
from popek.cost.profile import ProfileError, names, parse
from popek.events import INFO, KINDS
from popek.monitors import run_guest

GUESTS = Path(__file__).resolve().parent.parent / "samples" / "guests"
REQUIRED = {"p4-2006", "nehalem-2009", "sandybridge-2011", "modern", "ultrasparc-t1"}


def test_the_bundled_profiles_load_and_every_number_has_a_source_or_is_assumed():
    assert REQUIRED <= set(names())
    for name in names():
        p = load(name)
        for what, price in p.rows():
            assert (price.source is None) != (price.assumed is None) or price.parts, (name, what)
            assert not (price.checked and price.source is None), (name, what)


def test_every_priced_kind_of_the_vocabulary_has_a_price_in_every_x86_profile():
    for name in REQUIRED - {"ultrasparc-t1"}:
        p = load(name)
        priced = {k for (k, _) in p.prices}
        missing = {k for k, kind in KINDS.items() if kind.role != INFO and k != "hypertrap"} - priced
        assert not missing, (name, missing)


def test_modelled_cycles_are_the_sum_of_the_priced_events_by_hand():
    result = run_guest(str(GUESTS / "hello.s"), "trap", profile="p4-2006")
    p = load("p4-2006")
    by_hand = result.guest_instructions * p.instructions.cycles
    for kind, names_ in result.events.items():
        for name, count in names_.items():
            if KINDS[kind].role_of(name) != INFO:
                by_hand += count * p.price(kind, name)
    assert result.modelled_cycles == round(by_hand)
    assert result.profile["name"] == "p4-2006" and result.profile["unpriced"] == []
    assert result.to_dict()["modelled_cycles"] == result.modelled_cycles


def test_an_event_a_profile_cannot_price_is_listed_never_zero():
    p = parse('name = "tiny"\nprocessor = "x"\n[instructions]\ncycles = 1\nassumed = "for the test"\n')
    cost = price_events({"trap": {"cli": 3}}, 10, p)
    assert cost.cycles == 10 and cost.unpriced == ["trap: cli"]


@pytest.mark.parametrize("text, message, line", [
    ('name = "x"\nprocessor = "y"\n[instructions]\ncycles = 1\n', "exactly one of 'source'", 3),
    ('name = "x"\nprocessor = "y"\n[instructions]\ncycles = 1\nassumed = "z"\n[trap]\neach = { cycles = -1, assumed = "z" }\n',
     "negative cost", 7),
    ('name = "x"\nprocessor = "y"\n[instructions]\ncycles = 1\nassumed = "z"\n[nosuch]\neach = { cycles = 1, assumed = "z" }\n',
     "unknown event kind", 6),
    ('name = "x"\nprocessor = "y"\n[instructions]\ncycles = 1\nassumed = "z"\n[timer]\nirq0 = { cycles = 1, assumed = "z" }\n',
     "cost nothing", 6),
])
def test_bad_profiles_name_file_and_line(text, message, line):
    with pytest.raises(ProfileError) as err:
        parse(text, "bad.toml")
    assert message in str(err.value) and str(err.value).startswith(f"bad.toml:{line}:")


def test_profiles_command(tmp_path, capsys):
    assert main(["profiles"]) == 0
    assert "p4-2006" in capsys.readouterr().out
    assert main(["profiles", "p4-2006"]) == 0
    out = capsys.readouterr().out
    assert "Adams & Agesen" in out and "assumed:" in out
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n')
    assert main(["profiles", str(bad)]) == 2
    assert main(["run", str(GUESTS / "hello.s"), "--profile", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.toml" in err and "Traceback" not in err
