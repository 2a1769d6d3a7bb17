"""Print a command of the README's Quickstart exactly as written, or check Quickstart 1's output.

    python3 .ci/readme_commands.py quickstart 1     # the first bash block under "## Quickstart"
    python3 .ci/readme_commands.py tides-first OUT  # exit 1 unless the tides passage ranks first in OUT

Standard library only: CI runs it before any virtual environment exists.
"""

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def quickstart(number: int) -> str:
    section = README.read_text(encoding="utf-8").split("\n## Quickstart\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    return blocks[number - 1].strip()


def tides_first(output: str) -> bool:
    """The table's first data row (rank 1) is the tides passage."""
    for line in output.splitlines():
        cells = [c.strip() for c in re.split(r"[│|┃]", line) if c.strip()]
        if cells and cells[0] == "1":
            return "Ocean tides" in line
    return False


if __name__ == "__main__":
    if sys.argv[1] == "quickstart":
        print(quickstart(int(sys.argv[2])))
    elif sys.argv[1] == "tides-first":
        text = Path(sys.argv[2]).read_text(encoding="utf-8")
        if not tides_first(text):
            sys.exit(f"Quickstart 1 did not rank the tides passage first:\n{text[-3000:]}")
        print("Quickstart 1: the tides passage ranks first")
    else:
        sys.exit(__doc__)
