"""The directories of one emulated ComfyUI instance, and ComfyUI's rules for naming files in them."""

import os
import shutil
import time
from pathlib import Path

_ANNOTATIONS = {"[output]": "output", "[input]": "input", "[temp]": "temp"}


class InstanceFiles:
    """output/ (SaveImage), temp/ (PreviewImage, emptied at start), input/ (uploads), user/default/."""

    def __init__(self, root: Path):
        self.root = root
        self.output_dir = str(root / "output")
        self.temp_dir = str(root / "temp")
        self.input_dir = str(root / "input")
        self.user_dir = str(root / "user" / "default")

    def prepare(self) -> None:
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        for directory in (self.output_dir, self.temp_dir, self.input_dir, self.user_dir):
            os.makedirs(directory, exist_ok=True)

    def directory_by_type(self, kind: str) -> str | None:
        return {"output": self.output_dir, "input": self.input_dir, "temp": self.temp_dir}.get(kind)

    def annotated_filepath(self, name: str) -> tuple[str, str | None]:
        """`"a.png [output]"` → ("a.png", output dir); without an annotation the directory is None."""
        for suffix, kind in _ANNOTATIONS.items():
            if name.endswith(suffix):
                return name[: -len(suffix)].strip(), self.directory_by_type(kind)
        return name, None

    def input_file_exists(self, name: str) -> bool:
        name, directory = self.annotated_filepath(name)
        return os.path.isfile(os.path.join(directory or self.input_dir, name))

    def input_file_path(self, name: str) -> Path:
        name, directory = self.annotated_filepath(name)
        return Path(directory or self.input_dir) / name

    def user_path(self, relative: str) -> str | None:
        """The path of a userdata file, or None when it would leave the user's directory."""
        path = os.path.abspath(os.path.join(self.user_dir, relative))
        if os.path.commonpath((self.user_dir, path)) != self.user_dir:
            return None
        return path

    @staticmethod
    def save_image_path(
        filename_prefix: str, base_dir: str, width: int, height: int
    ) -> tuple[str, str, int, str]:
        """(folder, file name stem, first counter, subfolder), as ComfyUI's `get_save_image_path`.

        The counter continues after the highest one already on disk for this prefix, so numbering
        survives a restart of the instance, as it does in ComfyUI.
        """
        if "%" in filename_prefix:
            filename_prefix = _expand_variables(filename_prefix, width, height)
        subfolder = os.path.dirname(os.path.normpath(filename_prefix))
        filename = os.path.basename(os.path.normpath(filename_prefix))
        folder = os.path.join(base_dir, subfolder)
        if os.path.commonpath((base_dir, os.path.abspath(folder))) != base_dir:
            raise Exception(
                "**** ERROR: Saving image outside the output folder is not allowed."
                f"\n full_output_folder: {os.path.abspath(folder)}"
                f"\n         output_dir: {base_dir}"
                f"\n         commonpath: {os.path.commonpath((base_dir, os.path.abspath(folder)))}"
            )
        try:
            existing = os.listdir(folder)
        except FileNotFoundError:
            os.makedirs(folder, exist_ok=True)
            existing = []
        prefix_length = len(filename)
        counters = [0]
        for name in existing:
            prefix = name[: prefix_length + 1]
            if os.path.normcase(prefix[:-1]) != os.path.normcase(filename) or prefix[-1:] != "_":
                continue
            try:
                counters.append(int(name[prefix_length + 1 :].split("_")[0]))
            except ValueError:
                continue
        return folder, filename, max(counters) + 1, subfolder


def _expand_variables(text: str, width: int, height: int) -> str:
    now = time.localtime()
    replacements = {
        "%width%": str(width),
        "%height%": str(height),
        "%year%": str(now.tm_year),
        "%month%": f"{now.tm_mon:02}",
        "%day%": f"{now.tm_mday:02}",
        "%hour%": f"{now.tm_hour:02}",
        "%minute%": f"{now.tm_min:02}",
        "%second%": f"{now.tm_sec:02}",
    }
    for variable, value in replacements.items():
        text = text.replace(variable, value)
    return text
