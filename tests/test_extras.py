"""Dependencies: ranges in pyproject, the exact tested set in constraints.txt; chat and paint need
none of the `serve` and `train` extras, and a command that needs a missing extra says which one to
install (and fails before loading any model)."""
from __future__ import annotations

import subprocess
import sys

import pytest
from torch import nn

from viscpm.cli import main
from viscpm.cli import serve as serve_command
from viscpm.extras import MissingExtra
from viscpm.train.config import LoraSection
from viscpm.train.lora import add_lora

from .conftest import REPO_ROOT

SERVE_AND_TRAIN = ("fastapi", "uvicorn", "peft", "matplotlib")


def uninstall(monkeypatch, *modules: str) -> None:
    """Make ``import module`` fail as it does when the package is not installed."""
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


def never_load_models(args):
    raise AssertionError("the models were loaded before the missing extra was found")


@pytest.mark.parametrize("missing", ["uvicorn", "fastapi"])
def test_serve_names_the_serve_extra_before_loading_models(monkeypatch, capsys, missing):
    uninstall(monkeypatch, missing)
    if missing == "uvicorn":
        monkeypatch.setattr(serve_command, "build_serve_app", never_load_models)
    else:  # the app is built before any model is loaded
        monkeypatch.setattr("viscpm.pipelines.chat.VisCPMChat", never_load_models)
    assert main(["serve", "--no-paint"]) == 2
    err = capsys.readouterr().err
    assert f"needs {missing}, which is not installed: pip install 'viscpm[serve]'" in err, err


def test_plot_names_the_train_extra(monkeypatch, capsys, tmp_path):
    uninstall(monkeypatch, "matplotlib")
    assert main(["plot", str(tmp_path)]) == 2
    assert "viscpm plot needs matplotlib, which is not installed: pip install 'viscpm[train]'" in capsys.readouterr().err


def test_lora_names_the_train_extra(monkeypatch):
    uninstall(monkeypatch, "peft")
    with pytest.raises(MissingExtra, match=r"LoRA training needs peft, .*pip install 'viscpm\[train\]'"):
        add_lora(nn.Sequential(nn.Linear(2, 2)), LoraSection(target_modules=("0",)))


@pytest.mark.slow
def test_chat_and_paint_run_without_the_serve_and_train_extras(tmp_path):
    """README's first two commands, with the server and training packages unimportable."""
    run = ("import sys; sys.modules.update(dict.fromkeys({modules})); from viscpm.cli import main; "
           "sys.exit(main(sys.argv[1:]))").format(modules=SERVE_AND_TRAIN)
    for args in (["chat", "--image", str(REPO_ROOT / "examples" / "shapes.png"), "What is in the picture?"],
                 ["paint", "左上角有一个绿色的大圆形。", "-o", str(tmp_path / "painted.png"), "--steps", "2"]):
        done = subprocess.run([sys.executable, "-c", run, *args], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.strip(), args
    assert (tmp_path / "painted.png").stat().st_size > 0


def test_dependencies_are_ranges_and_the_constraints_pin_a_version_inside_each():
    """pyproject gives ranges (a lower bound, never an exact pin), so viscpm installs beside other
    packages; constraints.txt pins every declared package, extras included, to a version inside its
    range, so the exact set CI tests is one pip could choose."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    declared += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    pins = {}
    for line in (REPO_ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        if line.split("#")[0].strip():
            pinned = Requirement(line.split("#")[0])
            assert [s.operator for s in pinned.specifier] == ["=="], f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(pinned.name)] = next(iter(pinned.specifier)).version
    for requirement in declared:
        if canonicalize_name(requirement.name) == "viscpm":  # an extra made of other extras
            continue
        operators = {s.operator for s in requirement.specifier}
        assert ">=" in operators and not operators & {"==", "===", "~="}, f"{requirement}: a lower bound, not a pin"
        version = pins.get(canonicalize_name(requirement.name))
        assert version is not None, f"constraints.txt does not pin {requirement.name}"
        assert requirement.specifier.contains(version, prereleases=True), \
            f"constraints.txt pins {requirement.name}=={version}, outside pyproject's {requirement.specifier}"
