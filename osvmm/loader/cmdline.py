"""The kernel command-line builder, after rust-vmm linux-loader's ``Cmdline``.

Bad input is rejected when it is added, not when the guest kernel trips on it:
only printable ASCII; a key has no space, '=' or quote and is not empty; a
value has spaces only inside double quotes, and its quotes are balanced
(the way Linux's next_arg() splits the line); the whole line with its NUL
must fit the capacity, which for Linux is the setup header's cmdline_size + 1
(cmdline_size excludes the terminating NUL).
"""

from __future__ import annotations

from osvmm.errors import ConfigError


def _check_printable(s: str, what: str) -> None:
    for ch in s:
        if not " " <= ch <= "~":
            raise ConfigError(f"kernel command line: {what} {s!r} has non-printable {ch!r}")


def _check_quoting(s: str, what: str) -> None:
    """Spaces only inside double quotes, and the quotes balanced."""
    quoted = False
    for ch in s:
        if ch == '"':
            quoted = not quoted
        elif ch == " " and not quoted:
            raise ConfigError(f"kernel command line: {what} {s!r} has a space outside quotes")
    if quoted:
        raise ConfigError(f"kernel command line: {what} {s!r} has an unbalanced quote")


def _check_key(key: str) -> None:
    if not key:
        raise ConfigError("kernel command line: empty key")
    _check_printable(key, "key")
    for bad, what in ((" ", "a space"), ("=", "'='"), ('"', "a quote")):
        if bad in key:
            raise ConfigError(f"kernel command line: key {key!r} has {what}")


class Cmdline:
    """A kernel command line of at most ``capacity`` bytes, the NUL included."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ConfigError(f"kernel command line: capacity {capacity} leaves no room")
        self.capacity = capacity
        self._line = ""

    @classmethod
    def for_setup_header(cls, hdr, limit: int | None = None) -> Cmdline:
        """A builder sized for a Linux kernel: cmdline_size + 1, at most ``limit``."""
        cap = hdr.cmdline_size + 1
        return cls(min(cap, limit) if limit else cap)

    def _append(self, piece: str) -> None:
        new = f"{self._line} {piece}" if self._line else piece
        if len(new) + 1 > self.capacity:
            raise ConfigError(
                f"kernel command line too long: {len(new) + 1} bytes with its NUL, "
                f"the kernel takes {self.capacity} (adding {piece[:40]!r})"
            )
        self._line = new

    def insert(self, key: str, value: str) -> Cmdline:
        """Add ``key=value``; a value with spaces must be double-quoted."""
        _check_key(key)
        _check_printable(value, "value")
        _check_quoting(value, "value")
        self._append(f"{key}={value}")
        return self

    def insert_flag(self, key: str) -> Cmdline:
        """Add a bare ``key`` (e.g. ``quiet``, ``noxsave``)."""
        _check_key(key)
        self._append(key)
        return self

    def insert_multiple(self, key: str, values: list[str]) -> Cmdline:
        """Add ``key=v1,v2,...``."""
        if not values:
            raise ConfigError(f"kernel command line: no values for key {key!r}")
        for v in values:
            if "," in v:
                raise ConfigError(f"kernel command line: value {v!r} of {key!r} has a ','")
        return self.insert(key, ",".join(values))

    def insert_str(self, s: str) -> Cmdline:
        """Add free text (several space-separated parameters); blank text adds nothing."""
        _check_printable(s, "text")
        _check_quoting_text(s)
        s = s.strip(" ")
        if s:
            self._append(s)
        return self

    def as_bytes(self) -> bytes:
        """The line as the kernel reads it: ASCII, NUL terminated."""
        return self._line.encode("ascii") + b"\0"

    def __str__(self) -> str:
        return self._line

    def __len__(self) -> int:
        """Bytes of the line, without the NUL."""
        return len(self._line)


def split_init_args(text: str) -> tuple[str, str]:
    """(kernel parameters, init's arguments): Linux passes what follows a bare ``--``
    to init untouched, so the VMM's own words go before it."""
    words = text.split(" ")
    if "--" in words:
        at = words.index("--")
        return " ".join(words[:at]).strip(" "), " ".join(words[at + 1 :]).strip(" ")
    return text.strip(" "), ""


def _whole_quoted(param: str) -> bool:
    return len(param) >= 2 and param[0] == param[-1] == '"' and '"' not in param[1:-1]


def _check_quoting_text(s: str) -> None:
    """Free text: quotes balanced; each parameter's key non-empty and free of quotes,
    unless the whole parameter is quoted (Linux's next_arg() takes ``"a b"`` as one
    parameter); after a bare ``--`` every word is init's and only the balance counts."""
    if s.count('"') % 2:
        raise ConfigError(f"kernel command line: text {s!r} has an unbalanced quote")
    quoted = False
    param = ""
    init_args = False
    for ch in s + " ":
        if ch == '"':
            quoted = not quoted
        if ch == " " and not quoted:
            if param == "--":
                init_args = True
            elif param and not init_args and not _whole_quoted(param):
                key = param.split("=", 1)[0]
                if not key or '"' in key:
                    raise ConfigError(f"kernel command line: parameter {param!r} has a bad key")
            param = ""
        else:
            param += ch
