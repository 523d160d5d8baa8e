"""The command line's own checks and help, before Hydra runs anything.

Hydra's messages for a misspelled key end with "To append to your config use
+key=value", which starts a default run with the typo ignored. Here the
overrides are composed once beforehand and every mistake becomes one line with
a "did you mean", and `--help` lists every group's real options (the typed
`*_schema` bases hidden), `hydra/launcher` included.
"""

import difflib
import re
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from metatrain.errors import MetatrainError
from metatrain.keys import is_non_math

# Listed first in --help, in this order; any other folder of conf/ follows.
FIRST = ("algorithm", "dataset", "model", "network", "logger", "experiment", "ablation")


def groups(conf_dir: str) -> list[str]:
    """Every config group a user picks from: conf/'s folders, and Hydra's launchers."""
    found = sorted(p.name for p in Path(conf_dir).iterdir() if p.is_dir() and p.name != "hydra")
    return (
        [g for g in FIRST if g in found] + [g for g in found if g not in FIRST] + ["hydra/launcher"]
    )


def group_options(group: str) -> list[str]:
    """The options of a config group a user can choose (inside initialize_config_dir)."""
    loader = GlobalHydra.instance().config_loader()
    return sorted(o for o in loader.get_group_options(group) if not o.endswith("_schema"))


def _keys(node, prefix: str = "") -> list[str]:
    out = []
    for k, v in node.items():
        out.append(f"{prefix}{k}")
        if isinstance(v, dict):
            out += _keys(v, f"{prefix}{k}.")
    return out


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def _unknown_key(key: str, default, group_names: list[str]) -> MetatrainError:
    keys = _keys(OmegaConf.to_container(default, resolve=False)) + group_names
    hint = _suggest(key.lstrip("+~"), keys)
    return MetatrainError(
        f"unknown key {key}{hint or ''}" + ("" if hint else " (metatrain --help lists every key)")
    )


def _first_values(parsed) -> list[str]:
    """One composable override per override: a sweep's first value (its other
    values of a group are checked by name); a glob is left to the sweeper."""
    out = []
    for o in parsed:
        if not o.is_sweep_override():
            out.append(o.input_line)
        elif type(o.value()).__name__ != "Glob":
            values = list(o.sweep_string_iterator())
            out.append(f"{o.get_key_element()}={values[0]}")
    return out


# Groups whose options are switches that compose (each sets keys of its own): given
# more than once, the choices are combined into one list. Any other group given twice
# is refused: Hydra would keep the last choice and drop the others in silence. A plain
# key given twice keeps its last value, the usual "later overrides win" of a command
# line (base arguments, then a change), which scripts and tests rely on.
COMBINABLE = ("ablation",)


def combine_repeats(conf_dir: str, overrides: list[str]) -> list[str]:
    """`overrides` with a repeated COMBINABLE group merged into one list override
    (`ablation=drop_lslr ablation=drop_msl` -> `ablation=[drop_lslr,drop_msl]`), in
    the place of its first mention; MetatrainError for any other repeat, or for
    combined options that set the same key to different values."""
    parsed = _parse(overrides)
    group_names = groups(conf_dir)
    seen: dict[str, list] = {}
    for o in parsed:
        seen.setdefault(o.get_key_element().lstrip("+~"), []).append(o)
    out = []
    for o in parsed:
        key = o.get_key_element().lstrip("+~")
        mentions = seen[key]
        if len(mentions) == 1 or (key not in group_names and "/" not in key):
            out.append(o.input_line)
            continue
        values = ", ".join(m.input_line.split("=", 1)[-1] for m in mentions)
        if key not in COMBINABLE or any(m.is_sweep_override() for m in mentions):
            raise MetatrainError(
                f"{key} is given {len(mentions)} times ({values}); a run takes one {key}, "
                f"Hydra would keep the last in silence: keep one (several runs: -m {key}=a,b)"
            )
        if o is not mentions[0]:
            continue
        options = list(dict.fromkeys(v for m in mentions for v in _values(m)))
        _check_compatible(conf_dir, key, options)
        out.append(f"{key}=[{','.join(options)}]")
    return out


def _values(o) -> list[str]:
    value = o.value()
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def _check_compatible(conf_dir: str, group: str, options: list[str]) -> None:
    """Refuse options of one group that set the same key to different values."""
    set_by: dict[str, tuple[str, object]] = {}
    for option in options:
        path = Path(conf_dir) / group / f"{option}.yaml"
        if not path.is_file():
            continue  # an unknown option gets its own message from check()
        flat = _flat(OmegaConf.to_container(OmegaConf.load(path)) or {})
        for k, v in flat.items():
            if k in set_by and set_by[k][1] != v:
                raise MetatrainError(
                    f"{group}={set_by[k][0]} and {group}={option} both set {k} "
                    f"({set_by[k][1]} and {v}); keep one"
                )
            set_by.setdefault(k, (option, v))


def _flat(node: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in node.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check(conf_dir: str, overrides: list[str]) -> None:
    """Raise MetatrainError (one line) for an override that Hydra would refuse."""
    if not overrides:
        return
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as e:  # noqa: BLE001 - Hydra's grammar errors have several types
        first = str(e).strip().splitlines()[0]
        raise MetatrainError(f"cannot read the overrides ({first})") from None
    for o in parsed:
        _check_sweep_makes_cells(o)
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        default = compose("config")
        for o in parsed:  # every value of a swept group must name an option
            group = o.get_key_element().lstrip("+~")
            if group in groups(conf_dir) or "/" in group:
                if type(o.value()).__name__ == "Glob":
                    continue
                values = list(o.sweep_string_iterator()) if o.is_sweep_override() else None
                for v in values or _values(o):  # a list: several options of one group
                    _check_option(group, str(v))
        try:
            compose("config", overrides=_first_values(parsed), return_hydra_config=True)
        except Exception as e:  # noqa: BLE001 - translated to one line below
            raise _translate(e, default, groups(conf_dir)) from None


def _check_sweep_makes_cells(o) -> None:
    """A swept key that does not change the maths is left out of the run directory's
    name (keys.py), so its cells would share one directory and every cell after the
    first would find that run, finished or in use: refused before anything starts."""
    key = o.get_key_element().lstrip("+~")
    if not o.is_sweep_override() or not is_non_math(key):
        return
    values = o.input_line.split("=", 1)[-1]
    try:  # a glob or an interval has no list of values to show
        first = next(iter(o.sweep_string_iterator()))
    except Exception:  # noqa: BLE001 - whichever sweep type Hydra refuses to list
        first = "<value>"
    name = key.rsplit(".", 1)[-1]
    raise MetatrainError(
        f"{key} is swept ({values}) but does not change the maths, so it is left out of the "
        "run directories' names and the cells would share one: run one sweep per value, each "
        f"with its own sweep_name (metatrain -m ... {key}={first} sweep_name=<name>-{name}-{first})"
    )


def _check_option(group: str, option: str) -> None:
    options = group_options(group)
    if options and option not in options and option != "null":
        raise MetatrainError(
            f"{group}={option} is not an option{_suggest(option, options)} "
            f"({group}: {', '.join(options)})"
        )


# Launchers that come with an optional extra (pyproject.toml), by Hydra's config name.
EXTRA_LAUNCHERS = {
    "joblib": ("local", "hydra-joblib-launcher", "scale"),
    "submitit_slurm": ("slurm", "hydra-submitit-launcher", "scale"),
    "submitit_local": ("slurm", "hydra-submitit-launcher", "scale"),
}


def _translate(e: Exception, default, group_names: list[str]) -> MetatrainError:
    text = f"{e}\n{e.__cause__ or ''}"
    launcher = re.search(r"Could not load 'hydra/launcher/(\w+)'", text)
    if launcher and launcher.group(1) in EXTRA_LAUNCHERS:
        ours, package, extra = EXTRA_LAUNCHERS[launcher.group(1)]
        return MetatrainError(
            f"hydra/launcher={ours} needs {package}, which is not installed: "
            f"pip install 'metatrain[{extra}]' (make install does)"
        )
    found = re.search(r"Could not find '([^']+)/([^'/]+)'", text)
    if found:
        try:
            _check_option(*found.groups())
        except MetatrainError as err:
            return err
    key = re.search(r"Could not (?:override|append to config\.?)[^']*'([^']+)'", text)
    if "An item is already at" in text and key:
        return MetatrainError(f"{key.group(1)} exists: set it without the leading +")
    if key and re.search(r"not in struct|No match in the defaults|not in '", text):
        return _unknown_key(key.group(1), default, group_names)
    full_key = re.search(r"full_key: (\S+)", text)
    first = next((ln for ln in str(e.__cause__ or e).splitlines() if ln.strip()), str(e))
    where = f"{full_key.group(1)}: " if full_key and full_key.group(1) not in first else ""
    return MetatrainError(f"{where}{first.strip()}")


def help_text(conf_dir: str, overrides: list[str]) -> str:
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        cfg = compose("config", overrides=_first_values(_parse(overrides)))
        listed = [f"  {g}: {', '.join(group_options(g))}" for g in groups(conf_dir)]
        hydra_help = compose("config", return_hydra_config=True).hydra.help
    return "\n".join(
        [
            hydra_help.header,
            "",
            "Config groups (group=option):",
            *listed,
            "",
            hydra_help.footer,
            "",
            "Every key, with its value for these overrides (key=value sets one):",
            OmegaConf.to_yaml(cfg),
        ]
    )


def _parse(overrides: list[str]):
    return OverridesParser.create().parse_overrides(overrides) if overrides else []
