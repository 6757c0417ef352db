"""Submit the compiled pipeline to a Kubeflow Pipelines endpoint with ``kfp.Client``.

    python -m pipelines.submit --host https://kubeflow.example.com/pipeline --namespace my-profile \\
        epochs=200 batch_size=1024 num_nodes=4 gpus_per_node=1 source=cifar10 source_uri=/mnt/simclr/cifar

The host comes from ``--host`` or the KFP_HOST environment variable. Credentials: ``--token``
(or KFP_TOKEN: a bearer token, e.g. ``kubectl create token default-editor -n my-profile
--audience pipelines.kubeflow.org``), ``--cookies`` (or KFP_COOKIES: a Dex session cookie,
``authservice_session=...``), or, inside the cluster (a Kubeflow notebook), the projected
service-account token at /var/run/secrets/kubeflow/pipelines/token. The run uses the profile's
default service account (``default-editor``) unless ``--service-account`` names another. Parameters are
``name=value`` pairs named as in the pipeline (see ``--list``); values are read as JSON when
they parse (numbers, lists, objects), else as strings. Exit codes: 0 submitted, 2 bad usage
(unknown parameter, value of the wrong type, no host), 1 the endpoint refused or was unreachable.
"""

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from pipelines.compile import PIPELINE_FILE

# Pipeline-spec parameter types -> the Python types a value may have.
_TYPES = {"STRING": (str,), "NUMBER_INTEGER": (int,), "NUMBER_DOUBLE": (float, int), "BOOLEAN": (bool,), "LIST": (list,), "STRUCT": (dict,)}


class UsageError(Exception):
    pass


def pipeline_parameters(pipeline_file: str | Path) -> dict[str, dict[str, Any]]:
    """The compiled pipeline's run parameters: name -> {parameterType, defaultValue}."""
    path = Path(pipeline_file)
    if not path.is_file():
        raise UsageError(f"pipeline file {path} does not exist; compile it with `python -m pipelines.compile`")
    spec = next(yaml.safe_load_all(path.read_text()))  # the pipeline spec; a platform spec (PVC mounts) follows
    return spec["root"]["inputDefinitions"]["parameters"]


def parse_arguments(pairs: list[str], parameters: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``["epochs=10", "source=cifar10"]`` -> {"epochs": 10, "source": "cifar10"}, checked against ``parameters``."""
    arguments: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name:
            raise UsageError(f"argument {pair!r} is not name=value")
        if name not in parameters:
            raise UsageError(f"unknown pipeline parameter {name!r}; known: {', '.join(sorted(parameters))}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        kind = parameters[name]["parameterType"]
        if kind == "STRING" and not isinstance(value, str):
            value = text  # "123" meant as a string
        allowed = _TYPES.get(kind, (object,))
        if not isinstance(value, allowed) or (kind != "BOOLEAN" and isinstance(value, bool)):
            raise UsageError(f"pipeline parameter {name}={text!r}: expected {kind.lower().replace('number_', '')}")
        arguments[name] = value
    return arguments


BACKENDS = ("pytorchjob", "trainjob", "local")  # components/launcher's backends
SA_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"  # Kubeflow notebooks' projected token


def credentials(args: argparse.Namespace) -> dict[str, Any]:
    """kfp.Client's credential arguments: a token, cookies, or the in-cluster projected token."""
    if args.token:
        return {"existing_token": args.token}
    if args.cookies:
        return {"cookies": args.cookies}
    token_path = os.environ.get("KF_PIPELINES_SA_TOKEN_PATH", SA_TOKEN_PATH)
    if Path(token_path).is_file():
        from kfp.client import ServiceAccountTokenVolumeCredentials

        return {"credentials": ServiceAccountTokenVolumeCredentials(path=token_path)}
    return {}


def check_backend(pipeline_file: str | Path, parameters: dict[str, dict[str, Any]], arguments: dict[str, Any]) -> None:
    """Refuse an unknown backend, and a cluster backend on a pipeline compiled without a PVC (``--no-pvc``)."""
    backend = arguments.get("backend", parameters.get("backend", {}).get("defaultValue"))
    if backend not in BACKENDS:
        raise UsageError(f"backend={backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend != "local" and not pipeline_mounts_pvc(pipeline_file):
        raise UsageError(f"backend={backend} needs the PVC, and this pipeline was compiled with --no-pvc: "
                         "pass backend=local, or compile without --no-pvc")


def pipeline_mounts_pvc(pipeline_file: str | Path) -> bool:
    documents = list(yaml.safe_load_all(Path(pipeline_file).read_text()))
    executors = documents[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(documents) > 1 else {}
    return any(config.get("pvcMount") for config in executors.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.submit", description=__doc__.splitlines()[0])
    parser.add_argument("arguments", nargs="*", metavar="NAME=VALUE", help="pipeline parameters")
    parser.add_argument("--host", default=os.environ.get("KFP_HOST"), help="Kubeflow Pipelines endpoint (default: $KFP_HOST)")
    parser.add_argument("--pipeline", default=str(PIPELINE_FILE), help="compiled pipeline YAML (default: %(default)s)")
    parser.add_argument("--experiment", default="simclr", help="experiment name (default: %(default)s)")
    parser.add_argument("--run-name", default=None, help="run name (default: kfp's)")
    parser.add_argument("--namespace", default=os.environ.get("KFP_NAMESPACE"), help="Kubeflow profile namespace (multi-user installations; default: $KFP_NAMESPACE)")
    parser.add_argument("--token", default=os.environ.get("KFP_TOKEN"), help="bearer token for the endpoint (default: $KFP_TOKEN)")
    parser.add_argument("--cookies", default=os.environ.get("KFP_COOKIES"), help="cookie header for the endpoint, e.g. authservice_session=... (default: $KFP_COOKIES)")
    parser.add_argument("--service-account", default=None, help="the run's Kubernetes service account (default: the profile's default-editor)")
    parser.add_argument("--caching", choices=["on", "off", "pipeline"], default="pipeline",
                        help="reuse steps of earlier runs with the same inputs (default: as compiled, which is on)")
    parser.add_argument("--pipeline-root", default=None, help="where the run's artifacts go (default: the installation's, e.g. minio://mlpipeline/v2/artifacts)")
    parser.add_argument("--list", action="store_true", help="print the pipeline's parameters with their defaults and exit")
    parser.add_argument("--wait", action="store_true", help="wait for the run to finish; exit 1 unless it succeeds")
    args = parser.parse_args(argv)
    try:
        parameters = pipeline_parameters(args.pipeline)
        if args.list:
            for name, spec in sorted(parameters.items()):
                default = spec.get("defaultValue")
                if spec["parameterType"] == "NUMBER_INTEGER" and default is not None:
                    default = int(default)  # the spec stores every number as a double
                print(f"{name:22} {spec['parameterType'].lower().replace('number_', ''):8} default {json.dumps(default)}")
            return 0
        arguments = parse_arguments(args.arguments, parameters)
        check_backend(args.pipeline, parameters, arguments)
        if not args.host:
            raise UsageError("no Kubeflow Pipelines endpoint: pass --host URL or set KFP_HOST")
    except UsageError as error:
        print(f"submit: error: {error}", file=sys.stderr)
        return 2

    import kfp

    try:
        client = kfp.Client(host=args.host, namespace=args.namespace or "kubeflow", **credentials(args))
        run = client.create_run_from_pipeline_package(
            args.pipeline, arguments=arguments, run_name=args.run_name, experiment_name=args.experiment,
            namespace=args.namespace, service_account=args.service_account, pipeline_root=args.pipeline_root,
            enable_caching={"on": True, "off": False}.get(args.caching),
        )
    except Exception as error:  # connection refused, 401/403, a rejected spec: kfp raises many kinds
        print(f"submit: the endpoint {args.host} did not take the run: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    print(f"submitted run {run.run_id} to {args.host} (experiment {args.experiment})")
    if args.wait:
        result = client.wait_for_run_completion(run.run_id, timeout=7 * 24 * 3600)
        state = getattr(result, "state", None)
        print(f"run {run.run_id}: {state}")
        return 0 if str(state).upper() == "SUCCEEDED" else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
