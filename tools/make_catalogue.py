"""Write `src/lfm/cli/catalogue.json` from the live registry, asset tables and command groups.

    python tools/make_catalogue.py          # rewrite it
    python tools/make_catalogue.py --check  # exit 1 if it differs from the live registry

Run it after registering a method or adding a model, data set or command group; the test
`tests/test_catalogue.py` fails until then.
"""

from __future__ import annotations

import json
import sys

from lfm.cli.catalogue import FILE, build


def main() -> int:
    live = build()
    if "--check" in sys.argv[1:]:
        same = json.loads(FILE.read_text()) == live
        print(f"{FILE.name}: " + ("up to date" if same else "out of date"))
        return 0 if same else 1
    FILE.write_text(json.dumps(live, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
