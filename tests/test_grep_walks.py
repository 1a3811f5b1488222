"""The README's grep walks (Architecture, "From a card to its arithmetic, by grep") run as
written from the repository root, and every file each one names is hit: a walk that a rename
broke fails here."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECTION = re.search(
    r"### From a card to its arithmetic, by grep\n(.*?)\n## ",
    (ROOT / "README.md").read_text(),
    re.S,
)
COMMANDS = [
    line.split("  #")[0].strip()
    for block in re.findall(r"```bash\n(.*?)```", SECTION.group(1) if SECTION else "", re.S)
    for line in block.splitlines()
    if line.strip()
]


def test_the_walks_are_there() -> None:
    assert SECTION, "README.md lost its grep-walk subsection"
    assert len(COMMANDS) == 9, COMMANDS  # relu, matmul, cross_entropy: three hops each


@pytest.mark.parametrize("command", COMMANDS)
def test_each_hop_finds_every_file_it_names(command: str) -> None:
    words = shlex.split(command)
    assert words[0] == "grep", command
    named = "grep -H" + command.removeprefix("grep")  # file names even for one file
    done = subprocess.run(named, shell=True, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout, f"{command}: no hit ({done.stderr})"
    hit = {line.split(":", 1)[0] for line in done.stdout.splitlines()}
    for word in words[3:]:  # after grep, its option and its pattern: the files
        if "/" in word and "*" not in word:  # a file named outright
            assert word in hit, f"{command}: nothing found in {word}"
        elif "*" in word:  # a glob: at least one of its files
            assert any(Path(h).match(word) for h in hit), f"{command}: nothing in {word}"


def test_the_relu_walk_reaches_both_formulas() -> None:
    """The third hop lands on NumPy's formulas, the kernel's instantiation and its math."""
    last = subprocess.run(COMMANDS[2], shell=True, cwd=ROOT, capture_output=True, text=True).stdout
    assert "def _f_relu" in last and "def _dfy_relu" in last
    assert "GN_ACTIVATION_WITH_Y(relu, gn_relu, f32" in last
    assert "gn_relu_grad_y" in last
