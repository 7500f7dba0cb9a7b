"""Run a function on a module right after it is imported, without importing it ourselves.

Used to register hf_rlion's optimizer names with optional libraries (transformers, timm) whose
import takes seconds or which may be absent: ``import hf_rlion`` only installs a
:class:`PatchAfterImport` finder in ``sys.meta_path``.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
from types import ModuleType
from typing import Callable, Iterable


class PatchAfterImport(importlib.abc.MetaPathFinder):
    """Import hook: call ``patch(name, module)`` right after a module in ``targets`` has executed.

    The hook finds the module with the standard ``PathFinder`` and wraps its loader's
    ``exec_module``; for every other name it returns ``None`` so the import system goes on as usual.
    """

    def __init__(self, targets: Iterable[str], patch: Callable[[str, ModuleType], None]):
        self.targets = tuple(dict.fromkeys(targets))
        self.patch = patch
        self._local = threading.local()

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.targets or getattr(self._local, "busy", False):
            return None
        self._local.busy = True
        try:
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        finally:
            self._local.busy = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        original_exec = loader.exec_module
        patch = self.patch

        def exec_module(module):
            original_exec(module)
            patch(fullname, module)

        loader.exec_module = exec_module
        return spec

    def install(self) -> None:
        """Patch the targets already imported, and hook the later imports (idempotent)."""
        for name in self.targets:
            if name in sys.modules:
                self.patch(name, sys.modules[name])
        if self not in sys.meta_path:
            sys.meta_path.insert(0, self)

    def installed(self) -> bool:
        return self in sys.meta_path
