"""`make test-latest` and `make lock`: the newest allowed releases against the lock.

    python scripts/test_latest.py VENV LOCK REPORT       run the fast tier in VENV, write REPORT
    python scripts/test_latest.py --write-lock VENV LOCK  make VENV's releases the lock

VENV holds the newest releases that pyproject.toml allows (the Makefile installs them). The
report says when it ran, the fast tier's outcome and every release that differs from the lock,
so a break upstream is seen, with its likely culprit, before a user sees it.
"""

import argparse
import datetime
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK_HEADER = """\
# The exact, tested set of releases: the Makefile passes this file to every pip call as
# constraints (`pip install -c constraints.txt ...`), so a fresh clone installs what `make test`
# passed with, whatever is released upstream. pyproject.toml states the ranges fastalign
# supports. To refresh: `make test-latest` (the newest releases in range, in .venv-latest, and
# the fast tier), then `make lock` (those releases become this file), then `make clean test`.
# Written by scripts/test_latest.py on {date} (Python {python}).
"""


def releases(venv: Path) -> dict[str, str]:
    """name -> version of everything installed in ``venv`` but fastalign (installed editable)."""
    frozen = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "freeze", "--all",
                             "--exclude-editable"], check=True, capture_output=True, text=True)
    pinned = (line.split("==", 1) for line in frozen.stdout.splitlines() if "==" in line)
    # torch's CPU build carries a local label (2.13.0+cpu): the lock pins the public version,
    # which pip matches with either build.
    return {name.lower(): version.split("+", 1)[0] for name, version in pinned}


def read_lock(lock: Path) -> dict[str, str]:
    found = (re.match(r"([A-Za-z0-9_.\-]+)==(\S+)", line) for line in lock.read_text().splitlines())
    return {m.group(1).lower(): m.group(2) for m in found if m}


def write_lock(venv: Path, lock: Path) -> None:
    header = LOCK_HEADER.format(date=datetime.date.today().isoformat(),
                                python=".".join(map(str, sys.version_info[:3])))
    lines = [f"{name}=={version}" for name, version in sorted(releases(venv).items())]
    lock.write_text(header + "\n".join(lines) + "\n")
    print(f"{lock}: {len(lines)} releases from {venv}")


def differences(latest: dict[str, str], locked: dict[str, str]) -> list[str]:
    rows = []
    for name in sorted(set(latest) | set(locked)):
        if latest.get(name) != locked.get(name):
            rows.append(f"  {name}: lock {locked.get(name, '-')}, newest {latest.get(name, '-')}")
    return rows


def run_fast_tier(venv: Path, lock: Path, report: Path) -> int:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [str(venv / "bin" / "pytest"), "-n", "2", "-m", "not slow", "-q", "-p", "no:cacheprovider"]
    print("$", " ".join(command), flush=True)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    sys.stdout.write(done.stdout[-20000:])
    sys.stderr.write(done.stderr[-5000:])
    summary = [line for line in done.stdout.splitlines() if re.search(r"\d+ (passed|failed)", line)]
    failed = [line for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    changed = differences(releases(venv), read_lock(lock))
    python = ".".join(map(str, sys.version_info[:3]))
    text = [f"make test-latest, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC,"
            f" Python {python}: the fast tier (pytest -m 'not slow') on the newest releases that"
            " pyproject.toml allows",
            f"outcome: {'passed' if done.returncode == 0 else f'FAILED (exit {done.returncode})'}",
            f"pytest: {summary[-1].strip('= ') if summary else 'no summary line'}",
            *failed[:50],
            f"releases that differ from {lock.name} ({len(changed)}):", *(changed or ["  none"])]
    report.write_text("\n".join(text) + "\n")
    print(f"\nwritten to {report}")
    return done.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write-lock", action="store_true", help="write VENV's releases to LOCK")
    parser.add_argument("venv", type=Path)
    parser.add_argument("lock", type=Path)
    parser.add_argument("report", type=Path, nargs="?")
    args = parser.parse_args()
    if not (args.venv / "bin" / "python").exists():
        parser.error(f"venv: {args.venv} has no bin/python; run `make test-latest` first")
    if args.write_lock:
        write_lock(args.venv, args.lock)
        return 0
    if args.report is None:
        parser.error("report: give the file to write the outcome to")
    return run_fast_tier(args.venv, args.lock, args.report)


if __name__ == "__main__":
    sys.exit(main())
