"""Shipped configs resolve by name (`emomae pretrain demo`, `emomae info micro`, a fine-tuning
protocol) from any working directory, in a checkout and in a built wheel, whose package data holds
every YAML file of configs/."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from emomae.cli import main as emomae
from emomae.config import ConfigError, load_config, resolve_config_path

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted(p.relative_to(REPO / "configs").as_posix() for p in (REPO / "configs").rglob("*.yaml"))


def test_pretrain_by_name_works_outside_the_repository(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert emomae(["pretrain", "demo", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["depth"] == 4 and printed["data"]["shards"] == "demo_out/shards"


def test_finetune_protocols_and_model_sizes_resolve_by_name_too(tmp_path, monkeypatch):
    from finetune.protocols import FinetuneConfig

    monkeypatch.chdir(tmp_path)
    assert resolve_config_path("crema_d", "finetune") == REPO / "configs" / "finetune" / "crema_d.yaml"
    assert load_config(FinetuneConfig, "crema_d").protocol.name == "crema-d"
    assert resolve_config_path("micro", "model").name == "micro.yaml"


def test_an_unknown_name_lists_the_shipped_ones_and_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert emomae(["pretrain", "dmeo"]) == 2
    err = capsys.readouterr().err
    assert "'dmeo'" in err and "'demo'" in err and "'base'" in err and "_defaults" not in err
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        resolve_config_path("nope.yaml", "pretrain")  # a path stays a path, never a name


# The top-level code packages; the wheel test copies exactly these, so a new one must be added here.
CODE_PACKAGES = ("emomae", "pretrain", "finetune", "data_pipelines")


def test_pyproject_ships_every_package_and_every_config_folder():
    tomllib = pytest.importorskip("tomllib")
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    code = {
        p.parent.relative_to(REPO).as_posix().replace("/", ".")
        for top in CODE_PACKAGES
        for p in (REPO / top).rglob("__init__.py")
    }
    configs = {"emomae_configs"} | {
        f"emomae_configs.{p.name}" for p in (REPO / "configs").iterdir() if p.is_dir()
    }
    assert set(setuptools["packages"]) == code | configs
    assert setuptools["package-dir"] == {"emomae_configs": "configs"}
    assert all(setuptools["package-data"][name] == ["*.yaml"] for name in configs)


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of this checkout, unpacked as site-packages would hold it."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "MANIFEST.in"):
        shutil.copy(REPO / name, src / name)
    for name in (*CODE_PACKAGES, "configs"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            str(src),
            "-w",
            str(root / "dist"),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (root / "dist").glob("emomae-*.whl")
    site = root / "site"
    zipfile.ZipFile(wheel).extractall(site)
    return site


def test_the_wheel_holds_every_shipped_config(installed_wheel):
    packaged = sorted(
        p.relative_to(installed_wheel / "emomae_configs").as_posix()
        for p in (installed_wheel / "emomae_configs").rglob("*.yaml")
    )
    assert packaged == SHIPPED


def test_an_installed_wheel_resolves_names_from_any_directory(installed_wheel, tmp_path):
    probe = (
        "from emomae.config import resolve_config_path; from pretrain.train import load_pretrain_config; "
        "from pretrain.info import resolve_model_config; "
        "print(resolve_config_path('demo', 'pretrain')); "
        "print(load_pretrain_config('base', ['data.shards=x']).model.width, resolve_model_config('micro').width); "
        "from pretrain.deepspeed import CONFIG_DIR; print(CONFIG_DIR)"
    )
    env = {**os.environ, "PYTHONPATH": str(installed_wheel)}
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    path, sizes, deepspeed = out.stdout.strip().splitlines()
    assert Path(path) == installed_wheel / "emomae_configs" / "pretrain" / "demo.yaml"
    assert sizes == "512 128"
    assert (Path(deepspeed) / "zero2.yaml").is_file() and Path(deepspeed).is_relative_to(installed_wheel)
