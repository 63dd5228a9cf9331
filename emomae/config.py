"""OmegaConf configs: a dataclass schema gives defaults and types, YAML files and `key=value`
overrides are merged on top, and an unknown or mistyped key fails with a message naming it.

A config is a YAML path or the name of one that ships with emomae (`demo`, `base`, `micro`, `crema_d`):
`resolve_config_path` looks names up in `configs/<kind>/`, from the checkout beside this code or,
in an installed wheel, the `emomae_configs` package (pyproject.toml maps configs/ to it), so a name
works from any working directory.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


class RenamedKeyWarning(FutureWarning):
    """A config file or override used a key's old name (`RENAMED_KEYS`); it still works for now."""


# Keys that were renamed, per schema: old dotted key -> new dotted key (from the config's root). YAML
# files and `key=value` overrides that use an old key keep working: it is moved to the new key,
# with a RenamedKeyWarning naming both. Giving both names in one file or command line is an error.
RENAMED_KEYS: dict[str, dict[str, str]] = {
    "PretrainConfig": {
        "inject.paths": "inject.branches",  # the alignment branches (video, audio, fused)
        "inject.path_weights": "inject.branch_weights",
    },
}


# schema -> the folder of configs/ its named configs live in (load_config resolves names by schema)
CONFIG_KINDS = {"PretrainConfig": "pretrain", "ModelConfig": "model", "FinetuneConfig": "finetune"}
KIND_WORDS = {"model": "model size", "pretrain": "pretraining config", "finetune": "fine-tuning protocol"}
CHECKOUT_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PACKAGED_CONFIGS = "emomae_configs"


def config_root() -> Path:
    """The shipped configs/ folder: the checkout's (also an editable install's), else the wheel's package."""
    if (CHECKOUT_CONFIGS / "pretrain").is_dir():
        return CHECKOUT_CONFIGS
    spec = importlib.util.find_spec(PACKAGED_CONFIGS)
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    raise ConfigError(
        f"the configs that ship with emomae are missing (no {CHECKOUT_CONFIGS} and no "
        f"{PACKAGED_CONFIGS} package): reinstall emomae, or pass a YAML file path"
    )


def config_names(kind: str) -> list[str]:
    """Names of the shipped configs of one kind (`configs/<kind>/<name>.yaml`, `_*` bodies left out)."""
    return sorted(p.stem for p in (config_root() / kind).glob("*.yaml") if not p.stem.startswith("_"))


def resolve_config_path(spec: str | Path, kind: str | None) -> Path:
    """A YAML file path as it is, or a shipped config's name (`demo` -> configs/pretrain/demo.yaml)."""
    path = Path(spec)
    if path.is_file():
        return path
    looks_like_path = path.suffix in {".yaml", ".yml"} or len(path.parts) > 1
    if kind is None or looks_like_path:
        raise ConfigError(f"config file not found: {path}")
    named = config_root() / kind / f"{path.name}.yaml"
    if named.is_file():
        return named
    raise ConfigError(
        f"unknown {KIND_WORDS.get(kind, kind + ' config')} {str(spec)!r}: expected a YAML file "
        f"or one of {config_names(kind)}"
    )


def load_config(
    schema: type[T],
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    kind: str | None = None,
) -> DictConfig:
    """Merge schema defaults <- YAML file (after its `base:` chain) <- `key=value` overrides, and
    return the merged DictConfig (typed by the schema).

    `path` is a YAML file or a shipped config's name; `kind` (default: the schema's, `CONFIG_KINDS`)
    says which folder of configs/ names are looked up in (`resolve_config_path`).

    The YAML may name a parent file under `base:` (relative to itself; parents may have parents,
    e.g. configs/pretrain/large.yaml -> _defaults.yaml), merged first so size and protocol configs
    share a common body, and any mapping may hold `_file_: other.yaml` to be filled from that file
    (e.g. `model: {_file_: ../model/base.yaml}`), keys beside it winning; `${...}` interpolations are
    left for OmegaConf to resolve on the whole config. A key the schema lacks, a value of the wrong
    type, a missing or unparsable file and an override without `=` raise ConfigError naming it.
    """
    cfg = OmegaConf.structured(schema)
    renamed = RENAMED_KEYS.get(schema.__name__, {})
    if path is not None:
        path = resolve_config_path(path, kind or CONFIG_KINDS.get(schema.__name__))
        for layer in _yaml_chain(path):
            cfg = _merge(cfg, rename_keys(layer, renamed, where=str(path)), where=str(path))
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got {bad}")
        overrides = rename_overrides(list(overrides), renamed)
        cfg = _merge(cfg, OmegaConf.from_dotlist(overrides), where="command line")
    return cfg


def _warn_renamed(old: str, new: str, where: str) -> None:
    warnings.warn(
        f"config key {old!r} ({where}) is now {new!r}: the old name still works but will go; write {new!r}",
        RenamedKeyWarning,
        stacklevel=4,
    )


def rename_keys(layer: DictConfig, renamed: dict[str, str], where: str) -> DictConfig:
    """Move every old key of `renamed` that `layer` (one YAML file, its includes merged) holds to its
    new name, warning once per key; `${...}` values move as written, unresolved."""
    for old, new in renamed.items():
        parent, leaf = _parent_of(layer, old)
        if parent is None:
            continue
        if _parent_of(layer, new)[0] is not None:
            raise ConfigError(f"{where} sets both {old!r} and its new name {new!r}: keep only {new!r}")
        value = OmegaConf.to_container(parent, resolve=False)[leaf]
        del parent[leaf]
        OmegaConf.update(layer, new, value, force_add=True)
        _warn_renamed(old, new, where)
    return layer


def _parent_of(layer: Any, dotted: str) -> tuple[DictConfig | None, str]:
    """(the mapping that holds `dotted`'s last part, that part), or (None, part) when it is absent."""
    *parents, leaf = dotted.split(".")
    node = layer
    for key in parents:
        node = node.get(key) if isinstance(node, DictConfig) and key in node else None
    return (node, leaf) if isinstance(node, DictConfig) and leaf in node else (None, leaf)


def rename_overrides(overrides: list[str], renamed: dict[str, str]) -> list[str]:
    """`key=value` overrides with old keys (and keys below them) written with their new names."""
    out = []
    for override in overrides:
        key, value = override.split("=", 1)
        for old, new in renamed.items():
            if key == old or key.startswith(old + "."):
                new_key = new + key[len(old) :]
                if any(o.split("=", 1)[0] in (new, new_key) for o in overrides):
                    raise ConfigError(f"the command line sets both {key!r} and its new name {new_key!r}")
                _warn_renamed(key, new_key, "command line")
                key = new_key
                break
        out.append(f"{key}={value}")
    return out


def _yaml_chain(path: Path) -> list[DictConfig]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        node = OmegaConf.load(path)
    except Exception as err:  # yaml errors carry line numbers; keep them
        raise ConfigError(f"cannot parse YAML config {path}: {err}") from err
    base = node.pop("base", None)
    chain = _yaml_chain((path.parent / str(base)).resolve()) if base else []
    return [*chain, _include_files(node, path.parent)]


def _include_files(node: Any, folder: Path) -> Any:
    if not isinstance(node, DictConfig):
        return node
    included = node.pop("_file_", None)
    for key in list(node.keys()):
        if OmegaConf.is_interpolation(node, key):
            continue  # reading it would resolve `${...}` before the whole config exists
        node[key] = _include_files(node[key], folder)
    if included is None:
        return node
    layers = _yaml_chain((folder / str(included)).resolve())
    return OmegaConf.merge(*layers, node)


def _merge(cfg: DictConfig, layer: Any, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, layer)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or ""
        raise ConfigError(
            f"invalid config key or value {key!r} from {where}: {err.msg if hasattr(err, 'msg') else err}"
        ) from err


def save_config(cfg: DictConfig, path: str | Path) -> None:
    """Write the fully resolved config (what the run really used)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, path, resolve=True)
