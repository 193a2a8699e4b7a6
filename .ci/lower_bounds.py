"""Print `name==lower` for every install requirement in setup.cfg, for pip's --constraint.

CI installs these into a second venv to check that the declared lower bounds are true.
setup.cfg stays the one place where the bounds are written.
With `--requirements`: print the install and test requirements as written, for `pip install -r`
(CI installs both venvs' dependencies at once, then the project itself with --no-deps).
With `--image FILE` (tools/gpu_image.txt): the lent GPU image's pinned versions replace the bounds of
the packages it pins, and are added where setup.cfg has none: the lower-bound venv mirrors that image.
"""

import configparser
import re
import sys
from pathlib import Path

cfg = configparser.ConfigParser()
cfg.read(Path(__file__).resolve().parents[1] / "setup.cfg")
if sys.argv[1:] == ["--requirements"]:
    for line in (cfg["options"]["install_requires"] + cfg["options.extras_require"]["test"]).split("\n"):
        if line.strip():
            print(line.strip())
    sys.exit(0)
pins = {}
for line in cfg["options"]["install_requires"].split("\n"):
    match = re.match(r"\s*([A-Za-z0-9_.\-\[\]]+)\s*>=\s*([0-9][^,;\s]*)", line)
    if match:
        pins[match[1].lower()] = match[2]
    elif line.strip():
        sys.exit(f"setup.cfg: requirement {line.strip()!r} has no '>=' lower bound")
if sys.argv[1:2] == ["--image"]:
    for line in Path(sys.argv[2]).read_text().splitlines():
        name, _, version = line.split("#", 1)[0].strip().partition("==")
        if version:
            pins[name.lower()] = version
for name, version in pins.items():
    print(f"{name}=={version}")
