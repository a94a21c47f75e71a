"""SGDD: semantic-guided discrete diffusion — a sentence's meaning vector back into text.

`from sgdd import SGDD` gives the Python API (loaded lazily so `import sgdd` stays light).
"""

__version__ = "0.1.0"


def __getattr__(name):
    if name in ("SGDD", "InputError"):
        from sgdd import api

        return getattr(api, name)
    raise AttributeError(f"module 'sgdd' has no attribute {name!r}")


__all__ = ["SGDD", "InputError", "__version__"]
