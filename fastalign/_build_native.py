"""``python -m fastalign._build_native``: build (or find in its cache) the native CPU extension
now, instead of inside the first CPU op call, and say where it is or why it is unavailable.
Exits 0 either way: without a compiler fastalign still works, through the torch backend."""

from __future__ import annotations

import warnings

from . import _native


def main() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the reason is printed below instead
        reason = _native.unavailable_reason()
    capability = _native._capability()
    if reason is None:
        print(f"fastalign: native CPU kernels ready ({capability}, {_native.build_dir(capability)})")
    else:
        print(f"fastalign: native CPU kernels unavailable, CPU ops use the torch backend: {reason}")


if __name__ == "__main__":
    main()
