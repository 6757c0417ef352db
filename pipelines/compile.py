"""Compile the pipeline to one YAML file (for the Kubeflow Pipelines UI or `kfp run create`),
and every component to its reusable ``components/<step>/component.yaml``.

    python -m pipelines.compile                              # pipelines/simclr_pipeline.yaml + component YAMLs
    python -m pipelines.compile --image REGISTRY/simclr:TAG --out my_pipeline.yaml
    python -m pipelines.compile --kfp-backend 2.3 --compute eval_gpus=1 --out for_kubeflow_1_9.yaml
    python -m pipelines.compile --check                      # exit 1 if a checked-in YAML is stale

``--kfp-backend`` names the oldest Kubeflow Pipelines backend the file must run on (README:
supported versions). Before 2.4, a backend ignores step resources given as run parameters, so
they are compiled in: the defaults, or ``--compute NAME=VALUE``. Exit code 2 for bad flags.
"""

import argparse
import difflib
import sys
import tempfile
from pathlib import Path

from kfp import compiler

from components.common import DEFAULT_IMAGE
from pipelines.simclr_pipeline import COMPONENTS, KFP_BACKENDS, PARAMETERS, build_pipeline, with_image

ROOT = Path(__file__).resolve().parents[1]
PIPELINE_FILE = ROOT / "pipelines" / "simclr_pipeline.yaml"


def component_file(name: str) -> Path:
    return ROOT / "components" / name / "component.yaml"


def compile_pipeline(out: str | Path, image: str = DEFAULT_IMAGE, **options) -> Path:
    """Write the pipeline, every step on ``image``, to ``out``; return the path. ``options``
    go to :func:`pipelines.simclr_pipeline.build_pipeline` (kfp_backend, compute, mount_pvc, ...)."""
    compiler.Compiler().compile(build_pipeline(image, **options), str(out))
    return Path(out)


def parse_compute(pairs: list[str]) -> dict:
    """``["eval_gpus=1", "eval_memory_limit=32Gi"]`` -> a dict typed as the parameters are."""
    kinds = {p.name: p.type for p in PARAMETERS if p.compute}
    compute = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or name not in kinds:
            raise ValueError(f"--compute {pair!r}: expected NAME=VALUE with NAME one of {', '.join(kinds)}")
        compute[name] = kinds[name](value)
    return compute


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
    parser.add_argument("--kfp-backend", choices=KFP_BACKENDS, default=KFP_BACKENDS[-1],
                        help="the oldest KFP backend release to run on (Kubeflow 1.9: 2.2/2.3; 1.10.0: 2.4; 1.10.1+: 2.5; default %(default)s)")
    parser.add_argument("--compute", action="append", default=[], metavar="NAME=VALUE",
                        help="with --kfp-backend 2.2/2.3: a step compute setting compiled in (e.g. eval_gpus=1); repeatable")
    parser.add_argument("--no-pvc", action="store_true", help="mount no PVC (clusters without one: only backend=local works)")
    parser.add_argument("--s3-endpoint", default="", help="S3-compatible endpoint for s3:// sources (e.g. http://minio-service.kubeflow:9000)")
    parser.add_argument("--s3-secret", default="", help="Secret with accesskey/secretkey for s3:// sources (e.g. mlpipeline-minio-artifact)")
    parser.add_argument("--check", action="store_true", help="compile to a scratch directory and fail if a checked-in YAML differs")
    args = parser.parse_args(argv)
    try:
        options = dict(kfp_backend=args.kfp_backend, compute=parse_compute(args.compute), mount_pvc=not args.no_pvc,
                       s3_endpoint=args.s3_endpoint, s3_secret=args.s3_secret)
        build_pipeline(args.image, **options)  # checks the options before anything is written
    except ValueError as error:
        parser.error(str(error))  # exit code 2
    if args.check:
        problems = stale_files()
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print("stale YAML: run `python -m pipelines.compile` and commit the result", file=sys.stderr)
        return 1 if problems else 0
    path = compile_pipeline(args.out, args.image, **options)
    print(f"pipeline: {path} (KFP backend {args.kfp_backend} or newer)")
    if args.image == DEFAULT_IMAGE:  # the checked-in component YAMLs name the default image
        for name, component_path in compile_components().items():
            print(f"component {name}: {component_path.relative_to(ROOT)}")
    else:
        print("component YAMLs left as they are (they name the default image; pass --image to a copy with compile_components)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
