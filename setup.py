"""Build hook: the wheel carries the presets of ``configs/`` as package data
``delf_pipeline/presets/*.toml`` (the one source of presets is the top-level ``configs/``
folder; a source checkout reads it there, see ``delf_pipeline.config.presets_dir``).
Everything else is declared in setup.cfg."""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CONFIGS = Path(__file__).resolve().parent / "configs"


class BuildWithPresets(build_py):
    """``build_py`` that also copies ``configs/*.toml`` into the built package's ``presets/``."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads configs/ in the checkout itself
        target = Path(self.build_lib) / "delf_pipeline" / "presets"
        target.mkdir(parents=True, exist_ok=True)
        for preset in sorted(CONFIGS.glob("*.toml")):
            shutil.copyfile(preset, target / preset.name)


setup(cmdclass={"build_py": BuildWithPresets})
