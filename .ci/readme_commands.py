"""The README's commands and examples exactly as written, for .ci/run (tests/readme.py parses them).

    python3 .ci/readme_commands.py installs             # the install names: Quickstart, Haystack, LlamaIndex
    python3 .ci/readme_commands.py install NAME         # its bash: the Quickstart block, then the section's own
    python3 .ci/readme_commands.py examples NAME DIR    # write the Python examples run after NAME into DIR
    python3 .ci/readme_commands.py tests                # the Quickstart's second block (install and run the tests)
    python3 .ci/readme_commands.py tides-first OUT      # exit 1 unless the tides passage ranks first in OUT

Standard library only: CI runs it before any virtual environment exists.
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import readme  # noqa: E402  (standard library only, like this script)


def tides_first(output: str) -> bool:
    """The table's first data row (rank 1) is the tides passage."""
    for line in output.splitlines():
        cells = [c.strip() for c in re.split(r"[│|┃]", line) if c.strip()]
        if cells and cells[0] == "1":
            return "Ocean tides" in line
    return False


def write_examples(install: str, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for number, example in enumerate((e for e in readme.examples() if e.install == install), start=1):
        path = folder / f"{number:02d}-{re.sub(r'[^a-z0-9]+', '-', example.where.lower()).strip('-')}.py"
        path.write_text(f"# README.md, {example.where}\n{example.code}", encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    command, args = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("", [])
    if command == "installs":
        print("\n".join(readme.installs()))
    elif command == "install":
        print("\n".join(readme.installs()[args[0]]))
    elif command == "examples":
        print("\n".join(str(p) for p in write_examples(args[0], Path(args[1]))))
    elif command == "tests":
        print(readme.block(readme.QUICKSTART, readme.TESTS))
    elif command == "tides-first":
        text = Path(args[0]).read_text(encoding="utf-8")
        if not tides_first(text):
            sys.exit(f"the Quickstart did not rank the tides passage first:\n{text[-3000:]}")
        print("Quickstart: the tides passage ranks first")
    else:
        sys.exit(__doc__)
