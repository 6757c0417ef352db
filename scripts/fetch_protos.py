"""Keep the generated protobuf modules (``*_pb2.py``) of older kfp-pipeline-spec and
kfp-kubernetes releases under .venv-tools/protos/<name>-<version>/.

They are the definitions older Kubeflow Pipelines backends parse a compiled pipeline with;
tests/test_kfp_backends.py parses ours with them. Run by scripts/setup_tools.sh (pip
downloads the releases; nothing is installed). Idempotent.
"""

import pathlib
import subprocess
import sys
import tarfile
import tempfile
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROTOS_DIR = ROOT / ".venv-tools" / "protos"
RELEASES = (
    "kfp-pipeline-spec==0.3.0",  # KFP backend 2.2 / 2.3 (Kubeflow 1.9)
    "kfp-pipeline-spec==0.6.0",  # KFP backend 2.4 / 2.5 (Kubeflow 1.10)
    "kfp-kubernetes==1.2.0",     # KFP backend 2.2
    "kfp-kubernetes==1.3.0",     # KFP backend 2.3
    "kfp-kubernetes==1.4.0",     # KFP backend 2.4
)


def _pb2_files(archive: pathlib.Path) -> dict[str, bytes]:
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as opened:
            return {pathlib.Path(n).name: opened.read(n) for n in opened.namelist() if n.endswith("_pb2.py")}
    with tarfile.open(archive) as opened:
        return {pathlib.Path(m.name).name: opened.extractfile(m).read() for m in opened.getmembers() if m.name.endswith("_pb2.py")}


def fetch(release: str) -> pathlib.Path:
    dest = PROTOS_DIR / release.replace("==", "-")
    if dest.is_dir():
        return dest
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", scratch, release], check=True)
        files = {name: data for archive in pathlib.Path(scratch).iterdir() for name, data in _pb2_files(archive).items()}
    if not files:
        raise SystemExit(f"fetch_protos: {release} holds no *_pb2.py")
    partial = dest.with_name(dest.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (partial / name).write_bytes(data)
    partial.rename(dest)
    return dest


if __name__ == "__main__":
    for release in RELEASES:
        print(f"fetch_protos: {fetch(release).relative_to(ROOT)}")
