"""The bundled bare-metal guests: sources in ``src/``, built and cached by build.py.

A guest is named ``guests:NAME`` wherever an image path is accepted (the CLI's
IMAGE, a plan's ``image``); ``resolve_image`` turns that into the path of the
built guest and leaves any other path as it is.
"""

from __future__ import annotations

BUNDLED_PREFIX = "guests:"


def bundled_name(spec: str) -> str | None:
    """NAME for ``guests:NAME``, else None."""
    return spec[len(BUNDLED_PREFIX) :] if spec.startswith(BUNDLED_PREFIX) else None


def resolve_image(spec: str) -> str:
    """A path, or ``guests:NAME`` for a bundled guest (built on first use)."""
    name = bundled_name(spec)
    if name is None:
        return spec
    from osvmm.errors import ConfigError
    from osvmm.guests.build import GUEST_NAMES, guest_path

    if name not in GUEST_NAMES:
        raise ConfigError(f"no bundled guest {name!r}; there are: {', '.join(GUEST_NAMES)}")
    return str(guest_path(name))
