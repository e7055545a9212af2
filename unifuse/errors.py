"""The one exception type the library raises for bad input."""


class UnifuseError(ValueError):
    """Bad input: the message names the offending value and the fix."""


def choose(kind: str, name, options) -> str:
    """Return `name` if it is one of `options`, else raise one clear error listing them."""
    if name not in options:
        valid = ", ".join(sorted(map(str, options)))
        raise UnifuseError(f"unknown {kind} {name!r}; valid {kind}s: {valid}")
    return name
