"""
Hypothesis strategies for txgrace's tests: endpoint strings and socket
names.

The endpoint strategies never make a C{/}: an C{ssl:} string names files
that the parser reads, and relative names stay in the test's own
directory.
"""

from __future__ import annotations

from hypothesis import strategies as st

from txgrace.endpoints import SUPPORTED_TYPES, unparseEndpoint

# Every parameter of every supported type, and name=.
_KEYS = (
    "port",
    "interface",
    "backlog",
    "privateKey",
    "certKey",
    "sslmethod",
    "extraCertChain",
    "dhParameters",
    "address",
    "mode",
    "lockfile",
    "name",
)

_characters = st.characters(
    blacklist_categories=("Cs",), blacklist_characters="/"
)

# Text made mostly of what endpoint strings are made of, so that examples
# often get past the first check.
_pieces = st.one_of(
    st.sampled_from(
        [
            ":",
            "=",
            "\\",
            "\\:",
            "0",
            "8080",
            "99999",
            "-1",
            "127.0.0.1",
            "localhost",
            "::1",
            "600",
            "x.pem",
            *SUPPORTED_TYPES,
            *_KEYS,
            # Names of the parser's own arguments.
            "reactor",
            "self",
        ]
    ),
    st.text(_characters, max_size=4),
)

endpointTexts = st.lists(_pieces, max_size=12).map("".join)
"""
Any text, mostly pieces of endpoint strings: what follows C{grace:}.
"""

_values = st.one_of(
    st.sampled_from(["0", "8080", "99999", "x", "127.0.0.1", "localhost", "a:b", ""]),
    st.text(_characters, max_size=8),
)


@st.composite
def canonicalEndpointTexts(draw: st.DrawFn) -> str:
    """
    Text after C{grace:} written the way L{unparseEndpoint} writes it (the
    values without a key first, each key once, only C{:}, C{=} and C{\\}
    escaped), so that L{serverFromString} reads back exactly this text.
    """
    kind = draw(st.one_of(st.sampled_from(SUPPORTED_TYPES), st.text(_characters, max_size=4)))
    values = draw(st.lists(_values, max_size=2))
    keys = draw(
        st.lists(
            st.one_of(st.sampled_from(_KEYS), st.text(_characters, max_size=5)),
            max_size=4,
            unique=True,
        )
    )
    keyed = {key: draw(_values) for key in keys}
    return unparseEndpoint((kind, *values), dict(keyed))


addresses = st.lists(
    st.one_of(
        st.sampled_from(["%", "%25", "%3A", "3A", "%00", "00", ":", "\0", "/", "127.0.0.1"]),
        st.text(st.characters(blacklist_categories=("Cs",)), max_size=4),
    ),
    max_size=8,
).map("".join)
"""
Anything that could follow the type in an address: host and port, or a
UNIX socket's path, with many of the characters that names escape (C{%},
C{:}, NUL) and their escapes.
"""

socketNames = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
"""
Any name for L{txgrace.inherit.listenEnvironment}, passable or not.
"""
