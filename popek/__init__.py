"""popek: can a virtual machine monitor run this x86 code faithfully, and at what cost?

The library API (``popek.api``): ``scan``, ``run``, ``diff``, ``compare``, ``theorem``, ``assemble``. They
are imported on first use, so ``import popek`` stays cheap for the command line."""

__version__ = "0.1.0"

API = ("scan", "run", "diff", "compare", "theorem", "assemble")
__all__ = [*API, "__version__"]


def __getattr__(name: str):
    if name in API:
        from popek import api
        return getattr(api, name)
    raise AttributeError(f"module 'popek' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(API))
