"""Build a regular wheel and check it holds every module of lowbit/.

An editable install imports subpackages that a regular install would miss (DESIGN.md section 1),
so CI checks the wheel's file list against the source tree.
"""

import pathlib
import subprocess
import sys
import tempfile
import zipfile

root = pathlib.Path(__file__).resolve().parent.parent
with tempfile.TemporaryDirectory() as tmp:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            tmp,
            str(root),
        ],
        check=True,
    )
    (wheel,) = pathlib.Path(tmp).glob("lowbit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
missing = []
for path in (root / "lowbit").rglob("*"):
    if (
        path.is_file()
        and path.suffix in (".py", ".typed", ".txt")
        and "__pycache__" not in path.parts
    ):
        rel = path.relative_to(root).as_posix()
        if rel not in names:
            missing.append(rel)
if missing:
    sys.exit(
        f"the regular install misses {len(missing)} file(s): {missing[:10]} (update pyproject.toml)"
    )
print(f"wheel holds all {sum(n.startswith('lowbit/') for n in names)} package files")
