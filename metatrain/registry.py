"""Name -> implementation registries for learners, backbones and dataset readers.

A module registers what it defines with a decorator, beside its config schema:

    @LEARNERS.register("maml", MamlConfig)
    class Maml(MetaLearner): ...

and a registry imports every module of its package the first time it is asked,
so adding a learner, a backbone or a reader touches its own module, its YAML
(conf/<group>/<name>.yaml, whose defaults list names `<name>_schema`) and its
test: no list elsewhere names it. The schemas land in Hydra's ConfigStore through
metatrain.config.register_schemas.
"""

import importlib
import pkgutil
from dataclasses import dataclass

from metatrain.errors import MetatrainError


@dataclass(frozen=True)
class Entry:
    name: str
    target: object  # a class or a function, as the registry's users expect
    schema: type | None  # the dataclass that types conf/<group>/<name>.yaml


class Registry:
    def __init__(self, group: str, package: str):
        self.group = group  # the config group: algorithm, model or dataset
        self.package = package  # where the registering modules live
        self._entries: dict[str, Entry] = {}
        self._loaded = False

    def register(self, name: str, schema: type | None = None):
        def add(target):
            old = self._entries.get(name)
            if old is not None and old.target is not target:
                raise ValueError(f"{self.group} {name!r} is registered twice")
            self._entries[name] = Entry(name, target, schema)
            return target

        return add

    def load(self) -> None:
        """Import every module of the package once, so that all registrations ran."""
        if self._loaded:
            return
        pkg = importlib.import_module(self.package)
        for mod in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"{self.package}.{mod.name}")
        self._loaded = True

    def names(self) -> list[str]:
        self.load()
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        self.load()
        return [self._entries[n] for n in sorted(self._entries)]

    def get(self, name: str) -> Entry:
        self.load()
        if name not in self._entries:
            known = ", ".join(self.names())
            raise MetatrainError(f"unknown {self.group} {name!r}; known: {known}")
        return self._entries[name]

    def __contains__(self, name: str) -> bool:
        self.load()
        return name in self._entries


LEARNERS = Registry("algorithm", "metatrain.algorithms")
BACKBONES = Registry("model", "metatrain.models")
DATASETS = Registry("dataset", "metatrain.data")
ALL = (LEARNERS, BACKBONES, DATASETS)
