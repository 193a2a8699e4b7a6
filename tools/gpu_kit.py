"""Build the wheel kit for the lent GPU machine: every package moe-dist needs that its image lacks.

    python tools/gpu_kit.py .kit                     # CPython 3.12 on manylinux x86-64: the lent image
    python tools/gpu_kit.py /tmp/kit --python 3.11   # the same packages for this machine's rehearsal (CI)

The lent machine reaches no package index, and at most 64 MiB of working tree travels with a call, so
what its image lacks must travel as wheels, built here. What the image holds is `tools/gpu_image.txt`.
The requirements are setup.cfg's (install and test). A requirement the image satisfies is not carried;
one it does not (missing, or a pinned version outside the requirement) is carried at its declared lower
bound, the release CI tests; the carried packages' own dependencies are followed through each wheel's
metadata, at the newest release that fits, and again only what the image lacks is carried. DeepSpeed
publishes only a source release: it is built here into a pure-Python wheel (its ops compile just in time
on the GPU machine, as here).

Writes `DIR/*.whl` and `DIR/kit.json` (each wheel with its size and why it is carried, the image's packages
the kit relies on, the total), replacing only an earlier kit of ours, and refuses (exit 2, nothing
written) a kit larger than `--limit_mib` (40 MiB: the rest of the 64 is the working tree's).
On the GPU machine (docs/gpu/README.md):

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .kit/*.whl
"""

from __future__ import annotations

import argparse
import email.parser
import json
import os
import shlex
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from moe_dist.output_guard import OutputRefused, replace_dir

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "tools" / "gpu_image.txt"
BUILT_HERE = {"deepspeed"}  # source releases only: `pip wheel` builds them
# The image is Ubuntu 24.04's glibc 2.39: every manylinux tag up to it installs there.
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(39, 16, -1)] + ["manylinux2014_x86_64", "manylinux1_x86_64"]


class KitError(Exception):
    """The kit cannot be built as asked; the message is the one line the user sees."""


def read_image(path: Path = IMAGE) -> dict[str, Version | None]:
    """The image's packages: canonical name -> pinned version (None: present, version not read)."""
    image = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            image[canonicalize_name(name)] = Version(version) if version else None
    return image


def project_requirements() -> list[Requirement]:
    """setup.cfg's install and test requirements, as `.ci/lower_bounds.py` prints them (one reader of setup.cfg)."""
    out = subprocess.run(
        [sys.executable, ROOT / ".ci" / "lower_bounds.py", "--requirements"], check=True, capture_output=True, text=True
    ).stdout
    return [Requirement(line) for line in out.splitlines() if line.strip()]


def marker_env(python: str) -> dict[str, str]:
    major, minor = python.split(".")[:2]
    return {
        "python_version": f"{major}.{minor}",
        "python_full_version": f"{major}.{minor}.0",
        "os_name": "posix",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "platform_release": "",
        "platform_version": "",
        "implementation_name": "cpython",
        "implementation_version": f"{major}.{minor}.0",
        "platform_python_implementation": "CPython",
        "extra": "",
    }


def applies(req: Requirement, env: dict, extras: set[str]) -> bool:
    """Whether `req` (a Requires-Dist line) is needed for the target with the asked `extras`."""
    if req.marker is None:
        return True
    return any(Marker(str(req.marker)).evaluate({**env, "extra": e}) for e in (extras or {""}))


def image_satisfies(req: Requirement, image: dict) -> bool:
    name = canonicalize_name(req.name)
    if name not in image:
        return False
    return image[name] is None or req.specifier.contains(image[name], prereleases=True)


def lower_bound(req: Requirement) -> str:
    """`name==X` for a top-level `name>=X,...` (the release CI tests), else the requirement as written."""
    floors = [s.version for s in req.specifier if s.operator == ">="]
    return f"{req.name}=={floors[0]}" if floors else f"{req.name}{req.specifier}"


def fetch(spec: str, python: str, dest: Path) -> Path:
    """One wheel for `spec` (no dependencies) into `dest`: downloaded for the target, or built here."""
    name = canonicalize_name(Requirement(spec).name)
    before = set(dest.glob("*.whl"))
    if name in BUILT_HERE:
        cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-binary", name, "-w", dest, spec]
    else:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            python,
            "--implementation",
            "cp",
            *[a for p in PLATFORMS for a in ("--platform", p)],
            "-d",
            dest,
            spec,
        ]
    # DS_BUILD_OPS=0: DeepSpeed's wheel stays pure Python, its ops compiled where they run.
    proc = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, env={**os.environ, "DS_BUILD_OPS": "0"}
    )
    new = sorted(set(dest.glob("*.whl")) - before)
    if proc.returncode != 0 or len(new) != 1:
        last = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")][-1:] or ["no wheel written"]
        raise KitError(f"no wheel of {spec} for CPython {python} on manylinux x86-64: {last[0]}")
    return new[0]


def requires(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        message = email.parser.Parser().parsestr(zf.read(meta).decode())
    return [Requirement(r) for r in message.get_all("Requires-Dist") or []]


def resolve(top: list[Requirement], image: dict, python: str, dest: Path) -> tuple[list[dict], list[str]]:
    """Carried wheels (each with why) and the image packages they rely on, following dependencies breadth-first."""
    env = marker_env(python)
    queue = [(req, set(req.extras), "setup.cfg", True) for req in top]
    carried: dict[str, dict] = {}
    from_image: set[str] = set()
    while queue:
        req, extras, why, is_top = queue.pop(0)
        name = canonicalize_name(req.name)
        if image_satisfies(req, image):
            from_image.add(name)
        elif name in carried:
            if not req.specifier.contains(carried[name]["version"], prereleases=True):
                raise KitError(f"{why} needs {req}, but the kit carries {name} {carried[name]['version']}")
        else:
            wheel = fetch(lower_bound(req) if is_top else f"{req.name}{req.specifier}", python, dest)
            version = wheel.name.split("-")[1]
            carried[name] = {
                "name": name,
                "version": version,
                "file": wheel.name,
                "bytes": wheel.stat().st_size,
                "why": why,
                "in_image": name in image,
            }
            queue += [
                (dep, set(dep.extras), f"{name} {version}", False)
                for dep in requires(wheel)
                if applies(dep, env, extras)
            ]
    return list(carried.values()), sorted(from_image)


def build(out: Path, python: str, limit_mib: float) -> dict:
    image = read_image()
    with tempfile.TemporaryDirectory(prefix="gpu-kit-") as tmp:
        packages, from_image = resolve(project_requirements(), image, python, Path(tmp))
        total = sum(p["bytes"] for p in packages)
        kit = {
            "python": python,
            "platforms": "manylinux x86-64 (glibc <= 2.39)",
            "packages": packages,
            "from_image": from_image,
            "total_bytes": total,
            "limit_bytes": int(limit_mib * 2**20),
            "command": shlex.join(["python", "tools/gpu_kit.py", *sys.argv[1:]]),
        }
        if total > kit["limit_bytes"]:
            raise KitError(
                f"the kit is {total / 2**20:.1f} MiB, over --limit_mib {limit_mib:g}: "
                f"{', '.join(p['file'] for p in packages)}"
            )

        def write(staging: Path) -> None:
            staging.mkdir()
            for p in packages:
                (staging / p["file"]).write_bytes((Path(tmp) / p["file"]).read_bytes())
            (staging / "kit.json").write_text(json.dumps(kit, indent=1) + "\n")

        replace_dir(out, "gpu_kit", write, what="DIR")
    return kit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="the kit's folder (replaced whole if it is an earlier kit of ours)")
    parser.add_argument("--python", default="3.12", help="target CPython, MAJOR.MINOR (the lent image: 3.12)")
    parser.add_argument("--limit_mib", type=float, default=40.0, help="largest kit accepted, in MiB")
    args = parser.parse_args(argv)
    if not (args.python.count(".") == 1 and all(p.isdigit() for p in args.python.split("."))):
        print(f"gpu_kit: --python {args.python!r} is not MAJOR.MINOR (e.g. 3.12)", file=sys.stderr)
        return 2
    if not 0 < args.limit_mib < float("inf"):
        print(f"gpu_kit: --limit_mib {args.limit_mib:g} must be a positive number of MiB", file=sys.stderr)
        return 2
    try:
        kit = build(args.dir, args.python, args.limit_mib)
    except (KitError, OutputRefused) as err:
        print(f"gpu_kit: {err}", file=sys.stderr)
        return 2
    for p in kit["packages"]:
        print(f"  {p['bytes'] / 2**20:6.2f} MiB  {p['file']}  ({p['why']})")
    print(
        f"kit for CPython {args.python}: {len(kit['packages'])} wheels, {kit['total_bytes'] / 2**20:.2f} MiB "
        f"(limit {args.limit_mib:g} MiB) in {args.dir}; relies on the image's {', '.join(kit['from_image'])}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
