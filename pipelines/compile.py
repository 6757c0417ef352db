"""Compile the pipeline to one YAML file (for the Kubeflow Pipelines UI or `kfp run create`),
and every component to its reusable ``components/<step>/component.yaml``.

    python -m pipelines.compile                              # pipelines/simclr_pipeline.yaml + component YAMLs
    python -m pipelines.compile --image REGISTRY/simclr:TAG --out my_pipeline.yaml
    python -m pipelines.compile --check                      # exit 1 if a checked-in YAML is stale
"""

import argparse
import difflib
import sys
import tempfile
from pathlib import Path

from kfp import compiler

from components.common import DEFAULT_IMAGE
from pipelines.simclr_pipeline import COMPONENTS, build_pipeline, with_image

ROOT = Path(__file__).resolve().parents[1]
PIPELINE_FILE = ROOT / "pipelines" / "simclr_pipeline.yaml"


def component_file(name: str) -> Path:
    return ROOT / "components" / name / "component.yaml"


def compile_pipeline(out: str | Path, image: str = DEFAULT_IMAGE) -> Path:
    """Write the pipeline, every step on ``image``, to ``out``; return the path."""
    compiler.Compiler().compile(build_pipeline(image), str(out))
    return Path(out)


def compile_components(out_dir: str | Path | None = None, image: str = DEFAULT_IMAGE) -> dict[str, Path]:
    """Write each component's YAML (under ``out_dir``/<step>/ if given, else into components/)."""
    written = {}
    for name, component in COMPONENTS.items():
        path = Path(out_dir) / name / "component.yaml" if out_dir else component_file(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        compiler.Compiler().compile(with_image(component, image), str(path))
        written[name] = path
    return written


def stale_files() -> list[str]:
    """The checked-in YAMLs that differ from what the code compiles to now, with a short diff."""
    problems = []
    with tempfile.TemporaryDirectory() as scratch:
        fresh = compile_components(scratch)
        fresh["pipeline"] = compile_pipeline(Path(scratch) / "pipeline.yaml")
        for name, path in fresh.items():
            checked_in = PIPELINE_FILE if name == "pipeline" else component_file(name)
            old = checked_in.read_text().splitlines() if checked_in.is_file() else []
            diff = list(difflib.unified_diff(old, path.read_text().splitlines(), str(checked_in), "compiled now", lineterm="", n=1))
            if diff:
                problems.append("\n".join(diff[:20]))
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.compile", description=__doc__.splitlines()[0])
    parser.add_argument("--image", default=DEFAULT_IMAGE, help=f"the image every step runs (default {DEFAULT_IMAGE})")
    parser.add_argument("--out", default=str(PIPELINE_FILE), help="pipeline YAML to write (default: pipelines/simclr_pipeline.yaml)")
    parser.add_argument("--check", action="store_true", help="compile to a scratch directory and fail if a checked-in YAML differs")
    args = parser.parse_args(argv)
    if args.check:
        problems = stale_files()
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print("stale YAML: run `python -m pipelines.compile` and commit the result", file=sys.stderr)
        return 1 if problems else 0
    path = compile_pipeline(args.out, args.image)
    print(f"pipeline: {path}")
    if args.image == DEFAULT_IMAGE:  # the checked-in component YAMLs name the default image
        for name, component_path in compile_components().items():
            print(f"component {name}: {component_path.relative_to(ROOT)}")
    else:
        print("component YAMLs left as they are (they name the default image; pass --image to a copy with compile_components)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
