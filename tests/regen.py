"""Regenerate a checked-in test asset after a deliberate change, then review its diff.

    python -m tests.regen cli      # conf/REFERENCE.md: the config keys, types and defaults
    python -m tests.regen curves   # tests/assets/reference_curves.json: the smoke run's losses
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the test modules import conftest


def main(argv=None) -> None:
    what = (argv if argv is not None else sys.argv[1:]) or ["cli", "curves"]
    for name in what:
        if name == "cli":
            from test_cli_surface import REFERENCE, render
            REFERENCE.write_text(render())
            print(f"wrote {REFERENCE}")
        elif name == "curves":
            from test_reference_curves import write_reference
            print(f"wrote {write_reference()}")
        else:
            sys.exit(f"unknown asset {name!r}: choose cli or curves")


if __name__ == "__main__":
    main()
