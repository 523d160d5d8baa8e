"""`metatrain`: compose the config with Hydra, print it, train, report.

Errors a user can fix are printed as one line and exit with code 2. In a
multirun a failed cell writes error.txt in its directory and the sweep goes on.
"""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf
from rich.syntax import Syntax

from metatrain.config import register_schemas
from metatrain.errors import MetatrainError
from metatrain.files import is_writable_dir
from metatrain.keys import exclude_keys

# conf/ sits beside the package (editable install); an absolute path keeps Hydra
# from reading it as a Python module path when started from the console script.
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

register_schemas()
# A run directory named after the run's overrides; "default" when there are none.
OmegaConf.register_new_resolver(
    "mt_dirname", lambda s: str(s).replace("/", "_") or "default", replace=True
)
# Hydra's override_dirname.exclude_keys, generated from metatrain/keys.py.
OmegaConf.register_new_resolver(
    "mt_non_math_keys", lambda *, _root_: exclude_keys(_root_), replace=True
)


def _fail(message: str) -> None:
    print(f"metatrain: error: {message}", file=sys.stderr)
    sys.exit(2)


class OutputDirCheck(Callback):
    """Refuse an unwritable output directory before Hydra tries to create it."""

    def _check(self, config, key: str) -> None:
        HydraConfig.instance().set_config(config)
        path = Path(str(OmegaConf.select(config, key)))
        probe = path
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not (is_writable_dir(probe) if probe.is_dir() else False):
            _fail(f"cannot write to the output directory {path}; choose another with {key}=...")

    def on_run_start(self, config, **kwargs) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config, **kwargs) -> None:
        self._check(config, "hydra.sweep.dir")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def run(cfg) -> float | None:
    # Imported here, not at module level: torch loads only after Hydra's --help, and
    # the submitit launcher pickles this function by value, which a module-level
    # console (it holds a lock) would break.
    from metatrain.logging import console
    from metatrain.train import run_dir_of, train

    multirun = HydraConfig.get().mode.name == "MULTIRUN"
    console.print(Syntax(OmegaConf.to_yaml(cfg, resolve=True), "yaml", background_color="default"))
    try:
        results = train(cfg)
    except MetatrainError as e:
        if not multirun:
            _fail(str(e))
        (run_dir_of(cfg) / "error.txt").write_text(f"{e}\n")
        console.print(f"[red]metatrain: error: {e}")
        return None
    return results["test"]["acc"]


def main() -> None:
    run()


if __name__ == "__main__":
    main()
