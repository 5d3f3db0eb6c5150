"""Stores a quick run of ``ntkjax demo`` for the site's NTK-study guide.

    .venv/bin/python docs/hooks/ntk_study.py            # runs ``ntkjax demo --quick`` (minutes)
    .venv/bin/python docs/hooks/ntk_study.py --from DIR  # or stores a finished run from DIR

writes ``docs/guides/ntk_study/report.md`` (the run's report, headings one level down, figure
links pointing into that folder) and its figures, each shrunk to at most 640 pixels wide as a
64-colour PNG, so the committed run stays small. ``docs/guides/ntk_study.md`` includes the report
(``pymdownx.snippets``).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TARGET = ROOT / "docs" / "guides" / "ntk_study"
MAX_WIDTH = 640


def store(run_dir: Path) -> None:
    from PIL import Image

    TARGET.mkdir(parents=True, exist_ok=True)
    for old in TARGET.glob("*.png"):
        old.unlink()
    for png in sorted(run_dir.glob("*.png")):
        image = Image.open(png).convert("RGB")
        if image.width > MAX_WIDTH:
            image = image.resize((MAX_WIDTH, round(image.height * MAX_WIDTH / image.width)),
                                 Image.Resampling.LANCZOS)
        image.quantize(colors=64).save(TARGET / png.name, format="PNG", optimize=True)
    report = (run_dir / "report.md").read_text(encoding="utf-8")
    report = re.sub(r"^(#+) ", r"#\1 ", report, flags=re.M)  # below the guide's own title
    report = re.sub(r"\]\((s\d[^)]*\.png)\)", r"](ntk_study/\1)", report)
    (TARGET / "report.md").write_text(report, encoding="utf-8")
    total = sum(p.stat().st_size for p in TARGET.glob("*.png"))
    print(f"stored {len(list(TARGET.glob('*.png')))} figures, {total} bytes", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="run_dir", type=Path, default=None)
    args = parser.parse_args()
    if args.run_dir is not None:
        store(args.run_dir)
        return
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "ntkjax.study.cli", "demo", "--quick", "--out", tmp],
                       check=True)
        store(Path(tmp))


if __name__ == "__main__":
    main()
