"""Every command, every option: a bad value is one line on stderr and exit status 2, before any work
(issue 8 §4). Each row is a command line that must be refused."""
from __future__ import annotations

from pathlib import Path

import pytest

from popek.cli import main

ROOT = Path(__file__).resolve().parent.parent
HELLO = str(ROOT / "samples" / "guests" / "hello.s")

BAD = [
    # popek run
    ["run", HELLO, "--max-instructions", "-1"],
    ["run", HELLO, "--max-instructions", "0"],
    ["run", HELLO, "--max-instructions", "many"],
    ["run", HELLO, "--ram", "0"],
    ["run", HELLO, "--ram", "99999"],
    ["run", HELLO, "--monitor", "nope"],
    ["run", HELLO, "--monitor", "native", "--ring", "1"],
    ["run", HELLO, "--monitor", "trap", "--ring", "7"],
    ["run", HELLO, "--monitor", "trap", "--direct-user"],
    ["run", HELLO, "--entry", "-4"],
    ["run", HELLO, "--entry", "0x7fffffff"],
    ["run", HELLO, "--load-address", "0x1000"],
    ["run", HELLO, "--format", "xml"],
    ["run", "/no/such/guest.bin"],
    ["run", "/dev/zero"],
    ["run", str(ROOT)],
    ["run", HELLO, "--profile", "nope"],
    ["run", HELLO, "--profile", "/no/such/profile.toml"],
    ["run", HELLO, "-D", "1X"],
    ["run", str(ROOT / "README.md"), "-D", "PV"],
    ["run", HELLO, "--monitor", "native", "--cmdline", "x"],
    ["run", HELLO, "--monitor", "hvm", "--controls", "nope"],
    ["run", HELLO, "--monitor", "hvm", "--control", "nope=on"],
    ["run", HELLO, "--monitor", "hvm", "--control", "nokey"],
    ["run", HELLO, "--monitor", "hvm", "--vendor", "amd"],
    ["run", HELLO, "--vendor", "svm"],
    ["run", HELLO, "--controls", "kvm"],
    ["run", HELLO, "--monitor", "trap", "--trace-exits"],
    ["run", HELLO, "--monitor", "pv", "--ring", "1"],
    # popek diff
    ["diff", HELLO, "--max-instructions", "-1"],
    ["diff", HELLO, "--monitor", "nope"],
    ["diff", HELLO, "--ram", "0"],
    ["diff", HELLO, "--ring", "x"],
    ["diff", HELLO, "--monitor", "bt", "--ring", "1"],
    ["diff", "/no/such/guest.s"],
    ["diff", HELLO, "--monitor", "hvm", "--controls", "nope"],
    ["diff", HELLO, "--monitor", "trap", "--vendor", "svm"],
    ["diff", HELLO, "--monitor", "hvm", "--trace-exits"],
    # popek compare
    ["compare", HELLO, "--max-instructions", "-1"],
    ["compare", HELLO, "--plot", "/no/such/dir/p.png"],
    ["compare", HELLO, "--plot", "x.txt"],
    ["compare", HELLO, "--format", "xml"],
    ["compare", HELLO, "--profile", "nope"],
    ["compare", HELLO, "--monitors", ""],
    ["compare", HELLO, "--monitors", "trap,nope"],
    ["compare", HELLO, "--format", "csv", "--plot", "/no/such/dir/p.svg"],
    ["compare", HELLO, "--plot", str(ROOT)],
    # popek profiles, exercise, demo
    ["profiles", "nope"],
    ["profiles", "/no/such/profile.toml"],
    ["exercise", "show", "99"],
    ["exercise", "show", "x"],
    ["exercise", "check", "1", "/no/such/answer.isa"],
    ["exercise", "--samples", "/no/such", "list"],
    ["demo", "--step", "99"],
    ["demo", "--step", "x"],
    ["demo", "--samples", "/no/such", "--list"],
    # popek bench
    ["bench", "differential", "--examples", "-5"],
    ["bench", "differential", "--examples", "0"],
    ["bench", "differential", "--monitor", "nope"],
    ["bench", "differential", "--reference", "nope"],
    ["bench", "differential", "--jobs", "0"],
    ["bench", "differential", "--seed", "-1"],
    ["bench", "differential", "--shrink", "-1"],
    ["bench", "differential", "--monitor", "hvm", "--controls", "nope"],
    ["bench", "differential", "--monitor", "hvm", "--vendor", "amd"],
    ["bench", "differential", "--monitor", "hvm", "--control", "rdtsc-exiting=maybe"],
    ["bench", "differential", "--monitor", "trap", "--vendor", "svm"],
    ["bench", "differential", "--controls", "kvm"],
    ["bench", "images", "--examples", "0"],
    ["bench", "images", "--jobs", "0"],
    ["bench", "images", "--seed", "-2"],
    ["bench", "images", "--locate", "-1"],
    ["bench", "images", "--monitor", "nope"],
    ["bench", "images", "--max-instructions", "0"],
    ["bench", "images", "--save", "/no/such/dir/out"],
    ["bench", "images", "--save", "/etc/hostname"],
    ["bench", "images", "--controls", "kvm"],
    ["bench", "emulate", "--iterations", "0"],
    ["bench", "bt", "--iterations", "0"],
    ["bench", "bt", "--instructions", "-1"],
    ["bench", "pv", "--iterations", "0"],
    ["bench", "pv", "--iterations", "x"],
    ["bench", "sun4v", "--iterations", "0"],
    ["bench", "sun4v", "--iterations", "-3"],
    ["bench", "fuzz", "--examples", "-5"],
    ["bench", "fuzz", "--jobs", "0"],
    ["bench", "fuzz", "--seed", "-1"],
    ["bench", "fuzz", "--seeds", "/no/such/file"],
    ["bench", "nope"],
    # popek asm
    ["asm", "/no/such/source.s"],
    # commands
    ["nope"],
]


@pytest.mark.parametrize("argv", BAD, ids=[" ".join(a).replace(str(ROOT), ".") for a in BAD])
def test_a_bad_value_is_one_line_and_exit_2(argv, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "error" in captured.err, captured.err
    assert "Traceback" not in captured.err + captured.out
