"""Read a GPU kit's manifest (`KIT/kit.json`, written by tools/gpu_kit.py) for CI's rehearsal venv.

    python3 .ci/kit.py from-image KIT          # the image's packages the kit relies on: the mirror installs them
    python3 .ci/kit.py absent KIT              # what the kit carries and the image lacks: the mirror must not hold it
    python3 .ci/kit.py same KIT docs/gpu/kit.json   # exit 1 unless both kits carry packages of the same names

The rehearsal builds the kit for this machine's Python (3.11); `same` holds it to the 3.12 kit that travels
to the GPU machine (docs/gpu/kit.json), so the packages rehearsed are the packages carried.
"""

import json
import sys
from pathlib import Path


def manifest(path: str) -> dict:
    path = Path(path)
    return json.loads((path / "kit.json" if path.is_dir() else path).read_text())


verb, kit = sys.argv[1], manifest(sys.argv[2])
if verb == "from-image":
    print(" ".join(kit["from_image"]))
elif verb == "absent":
    print(" ".join(p["name"] for p in kit["packages"] if not p["in_image"]))
elif verb == "same":
    other = manifest(sys.argv[3])
    # Names, not versions: a dependency's newest release moves between two builds, its name does not.
    ours, theirs = (sorted(p["name"] for p in k["packages"]) for k in (kit, other))
    if ours != theirs:
        sys.exit(
            f"the kit for CPython {kit['python']} carries {ours}, the one for CPython {other['python']} "
            f"({sys.argv[3]}) {theirs}: rebuild that one with its command: {other['command']}"
        )
    print(f"the kits for CPython {kit['python']} and {other['python']} carry the same {len(ours)} packages")
else:
    sys.exit(f"unknown verb {verb!r}: from-image, absent or same")
