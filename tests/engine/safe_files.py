"""What a download may hold: safetensors and JSON, and otherwise at least no pickle (torch.save's format runs code on load)."""

import json

from safetensors import safe_open

# What torch.save writes starts with one of these: a zip archive (its default), or a bare pickle of protocol 2-5.
PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


def assert_no_pickles(directory):
    """Every file under `directory` is JSON, safetensors, or else at least no pickle.

    A safetensors file starts with its header's length, which may begin like a pickle
    (0x80...), so it is opened as safetensors instead.
    """
    files = [path for path in directory.rglob("*") if path.is_file()]
    assert files, f"no file under {directory}"
    for path in files:
        assert not path.name.endswith(PICKLE_SUFFIXES), path
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            with safe_open(path, framework="pt"):
                pass  # raises unless it is safetensors
        else:
            with open(path, "rb") as stream:
                assert not stream.read(4).startswith(PICKLE_MAGIC), path
