"""Import an enclave's Python code from the image held in memory.

The platform passes the verified image's bytes to the enclave process; the
code is imported straight from them (no files are written), so what runs is
exactly what was measured.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

from ..errors import ImageError
from ..sgx.image import EnclaveImage
from .sdk import Enclave


def _module_table(files: Mapping[str, bytes]) -> dict[str, tuple[str, bytes, bool]]:
    """Module name -> (path, code, is package).

    Independent of the order of ``files`` (which the untrusted side chooses), so the
    measurement alone decides what runs: when ``x.py`` and ``x/__init__.py`` both
    exist, the package wins, as on Python's own path.
    """

    table: dict[str, tuple[str, bytes, bool]] = {}
    for path, data in sorted(files.items()):
        if not path.endswith(".py"):
            continue
        parts = path[:-3].split("/")
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        if not parts or not all(p.isidentifier() for p in parts):
            continue
        name = ".".join(parts)
        if name in table and table[name][2] and not is_pkg:
            continue
        table[name] = (path, data, is_pkg)
    return table


class _ImageFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, image_name: str, files: Mapping[str, bytes]) -> None:
        self._name = image_name
        self._modules = _module_table(files)

    @property
    def names(self) -> set[str]:
        return set(self._modules)

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        entry = self._modules.get(fullname)
        if entry is None:
            return None
        spec = importlib.util.spec_from_loader(fullname, self, is_package=entry[2])
        if spec is not None:
            spec.origin = f"<enclave {self._name}>/{entry[0]}"
        return spec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        path, data, is_pkg = self._modules[module.__name__]
        if is_pkg:
            module.__path__ = []
        code = compile(data, f"<enclave {self._name}>/{path}", "exec", dont_inherit=True)
        exec(code, module.__dict__)  # noqa: S102 - the measured, signature-checked enclave code


def load_enclave_class(image: EnclaveImage) -> type[Enclave]:
    """Import the image's entry class; the image's modules do not stay importable."""

    module_name, _, class_name = image.manifest.entry.partition(":")
    finder = _ImageFinder(image.manifest.name, image.files)
    if module_name not in finder.names:
        raise ImageError(f"entry module {module_name!r} is not in the image")
    sys.meta_path.insert(0, finder)
    saved = {n: sys.modules.pop(n) for n in finder.names if n in sys.modules}
    try:
        module = importlib.import_module(module_name)
        cls: Any = getattr(module, class_name, None)
    except ImportError as exc:
        raise ImageError(
            f"cannot import the enclave entry {image.manifest.entry!r}: {exc}"
        ) from exc
    except Exception as exc:
        # The enclave's own code failed while it was imported; its message may
        # hold a secret, so only the type leaves the enclave.
        raise ImageError(
            f"importing the enclave entry {image.manifest.entry!r} failed: {type(exc).__name__}"
        ) from None
    finally:
        sys.meta_path.remove(finder)
        for n in finder.names:
            sys.modules.pop(n, None)
        sys.modules.update(saved)
    if not (isinstance(cls, type) and issubclass(cls, Enclave)):
        raise ImageError(f"entry {image.manifest.entry!r} is not an Enclave subclass")
    return cls
