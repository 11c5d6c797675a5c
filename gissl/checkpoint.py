"""Reading and writing checkpoint files safely.

A checkpoint is data, never code: every read goes through ``torch.load(weights_only=True)``
(or safetensors), and every write goes to a temporary file in the same folder that is
then renamed over the target, so a crash never leaves a half-written checkpoint behind.
"""
import argparse
import os
import pathlib
import pickle
import random
import tempfile
import zipfile

import numpy as np
import torch

from gissl.errors import CheckpointError

# what to do about a file that is cut short or is something else under a checkpoint's name
_AGAIN = "copy or download it again, or pass the path of the right file"
# Plain-data classes that official training scripts pickle beside the weights, allowed on top
# of torch's weights-only set: MAE's, DINO's and EndoFinder's checkpoints store their
# command line as 'args': argparse.Namespace(...) (a bag of attributes; unpickling one only
# sets them). Their values are str/int/float/bool/list/tuple/None; forks of these scripts often
# add pathlib paths (e.g. output_dir), which only hold strings. No class here runs code or I/O.
SAFE_GLOBALS = (argparse.Namespace, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath,
                pathlib.PureWindowsPath)


def load_file(path):
    """Load a checkpoint file as plain data (dict of tensors / numbers / strings).

    Accepts ``.pth``/``.pth.tar``/``.pt`` files written by ``torch.save`` and
    ``.safetensors`` files. Raises :class:`CheckpointError` with the reason for a missing,
    truncated, non-checkpoint or unsafe (code-carrying pickle) file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint '{path}' does not exist; pass the path of a local file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint '{path}' is empty (0 bytes); the download or copy was "
                              f"incomplete: {_AGAIN}")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file as load_safetensors
        except ImportError:
            raise CheckpointError(
                f"'{path}' is a .safetensors file but the 'safetensors' package is not installed; "
                "run 'pip install safetensors' or convert the file to .pth") from None
        try:
            return load_safetensors(path)
        except Exception as e:
            raise CheckpointError(f"cannot read safetensors file '{path}': {e}; it is truncated or not "
                                  f"a safetensors file: {_AGAIN}") from None
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive ("PK"); very old files are raw pickles (protocol byte 0x80)
    if not (head.startswith(b"PK") or head.startswith(b"\x80")):
        raise CheckpointError(f"cannot read checkpoint '{path}': the file is truncated or is not "
                              "a PyTorch checkpoint (it is neither a torch.save archive nor a pickle); "
                              f"{_AGAIN}")
    if head.startswith(b"PK") and _is_torchscript(path):
        raise CheckpointError(
            f"'{path}' is a TorchScript program (a compiled model saved with torch.jit.save, e.g. SSCD's "
            "*.torchscript.pt), not a checkpoint of weights; gissl loads weights only and never runs a "
            "file's code. Use the plain weights file of the same model instead (SSCD publishes "
            "sscd_disc_mixup.torchvision.pt beside sscd_disc_mixup.torchscript.pt), or, if you trust the file, "
            f"extract its weights: python -c \"import torch; torch.save(torch.jit.load('{path}').state_dict(), "
            "'weights.pth')\" and pass weights.pth with --checkpoint")
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = [line.strip() for line in str(e).splitlines() if "unsupported" in line.lower()]
        raise CheckpointError(
            f"refused to load '{path}': it contains Python objects other than tensors and plain "
            f"data, which could run code when unpickled ({why[0] if why else 'not weights-only'}). "
            "Re-save it as a plain state dict (torch.save(model.state_dict(), ...)) or as "
            ".safetensors") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(
            f"cannot read checkpoint '{path}': the file is truncated or is not a PyTorch "
            f"checkpoint ({type(e).__name__}: {_first_sentence(e)}); {_AGAIN}") from None


def _is_torchscript(path):
    """True for a ``torch.jit.save`` archive: its zip holds the program's ``code/`` and a
    ``constants.pkl``, which ``torch.save`` archives never do."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False  # reported by torch.load below as truncated / not a checkpoint
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def _first_sentence(e):
    # torch's reader errors go on for a paragraph; its first sentence says what failed
    return (str(e).splitlines() or [""])[0].split(". ")[0]


def save_atomic(obj, path, before_replace=None):
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over ``path``.

    Readers see either the previous file or the complete new one, never a partial file:
    a crash or a full disk leaves ``path`` as it was. A failed write removes its temporary
    file; one left by a killed process is named ``.tmp-<file name>-<random>`` (no ``.pth``
    ending, so it is never mistaken for a checkpoint) and :func:`gissl.engine.fit` removes
    those of its own run. ``before_replace(tmp_path)``, if given, runs just before the
    rename (tests inject crashes there).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{os.path.basename(path)}-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def rng_state():
    """All random-number-generator states of this process, as plain data."""
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[0], random.getstate()[2]],
        "numpy": np.random.get_state()[1].tolist() + [int(np.random.get_state()[2])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Inverse of :func:`rng_state`."""
    py = state["python"]
    random.setstate((int(py[-2]), tuple(int(v) for v in py[:-2]), py[-1]))
    np_state = np.random.get_state()
    np.random.set_state((np_state[0], np.asarray(state["numpy"][:-1], dtype=np.uint32),
                         int(state["numpy"][-1]), 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
