"""OmegaConf configs: a dataclass schema gives defaults and types, YAML files and `key=value`
overrides are merged on top, and an unknown or mistyped key fails with a message naming it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def load_config(schema: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Merge schema defaults <- YAML file (and its `defaults:` chain) <- `key=value` overrides.

    The YAML may name a parent file under `base:` (relative to itself) so size and protocol
    configs can share a common body, and any mapping may hold `_file_: other.yaml` to be filled
    from that file (e.g. `model: {_file_: ../model/base.yaml}`), keys beside it winning.
    """
    cfg = OmegaConf.structured(schema)
    if path is not None:
        for layer in _yaml_chain(Path(path)):
            cfg = _merge(cfg, layer, where=str(path))
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got {bad}")
        cfg = _merge(cfg, OmegaConf.from_dotlist(list(overrides)), where="command line")
    return cfg


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
        raise ConfigError(f"invalid config key or value {key!r} from {where}: {err.msg if hasattr(err, 'msg') else err}") from err


def save_config(cfg: DictConfig, path: str | Path) -> None:
    """Write the fully resolved config (what the run really used)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, path, resolve=True)
