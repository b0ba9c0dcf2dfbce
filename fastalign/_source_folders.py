"""``fastalign.kernels`` and ``fastalign.csrc`` in a source checkout.

The Triton kernels (``kernels/``) and the C++ sources of the native CPU kernels (``csrc/``) sit at
the repository's top level and are installed as the subpackages ``fastalign.kernels`` and
``fastalign.csrc`` (setup.py's ``package_dir``). Neither folder has an ``__init__.py``: with one,
any Python started from the repository root (``python -m``, ``torchrun``, a worker subprocess,
pytest) could import it as a top-level ``kernels`` or ``csrc`` and shadow the PyPI package of that
name (Hugging Face's kernel hub ``kernels``, which transformers imports). A folder without
``__init__.py`` loses to any installed regular package of its name, so it shadows nothing.

In an installed wheel the two folders lie inside ``fastalign/`` and Python finds them there. In a
checkout (the editable install) they do not, and setuptools' editable finder maps only folders
that have an ``__init__.py``; so ``mount`` gives each one its module, a namespace package whose
only path is that folder, before anything imports it.
"""

import importlib.machinery
import importlib.util
import os
import sys
from types import ModuleType

# Each folder with a file that only fastalign's has, so that a folder of another project that
# happens to lie beside fastalign/ (PyPI's kernels/ in a site-packages) is never taken for ours.
FOLDERS = {"kernels": "_interpreter.py", "csrc": "bindings.cpp"}


def mount(package: ModuleType) -> None:
    """Registers ``<package>.kernels`` and ``<package>.csrc`` from the folders beside the
    package's own, where the package does not hold them itself (a checkout, not a wheel)."""
    package_dir = package.__path__[0]
    for name, marker in FOLDERS.items():
        full_name = f"{package.__name__}.{name}"
        folder = os.path.join(os.path.dirname(package_dir), name)
        if (full_name in sys.modules or os.path.isdir(os.path.join(package_dir, name))
                or not os.path.isfile(os.path.join(folder, marker))):
            continue
        spec = importlib.machinery.ModuleSpec(full_name, None, is_package=True)
        spec.submodule_search_locations = [folder]
        module = importlib.util.module_from_spec(spec)
        sys.modules[full_name] = module
        setattr(package, name, module)
