"""Which opens a mail privacy proxy made rather than a person: pure, from the User-Agent alone.

Some mailbox providers fetch a message's images themselves, whether or not anyone reads it: Apple
Mail Privacy Protection on delivery, Gmail and Yahoo through their image proxies when the message is
shown (so a person may be behind those, but the open cannot be told from a prefetch). Such opens are
recorded and counted apart (`proxy_opens`, `proxy_opened`).

The rules, in order (case-sensitive substrings, as the proxies send them):

| User-Agent | proxy |
|---|---|
| contains `GoogleImageProxy` | Gmail's image proxy (`... (via ggpht.com GoogleImageProxy)`) |
| contains `YahooMailProxy` | Yahoo Mail's image proxy |
| exactly `Mozilla/5.0` (trimmed) | Apple Mail Privacy Protection |

Apple's proxy sends the bare product token `Mozilla/5.0` and nothing else, which no browser and no
mail client fetching for itself does (they all add a platform in parentheses). Apple's egress
addresses are left out on purpose: its published ranges are long and change, and the User-Agent
already tells its fetches apart. Anything else, a missing User-Agent included, is a person's open.
"""
from __future__ import annotations

# (substring, proxy name): the first that matches names the proxy.
_SUBSTRINGS = (("GoogleImageProxy", "gmail"), ("YahooMailProxy", "yahoo"))
_APPLE_EXACT = "Mozilla/5.0"


def privacy_proxy(user_agent: str | None) -> str | None:
    """The mail privacy proxy that made a request with this User-Agent (`gmail`, `yahoo`, `apple`),
    or None for a person's mail client or browser."""
    if not user_agent:
        return None
    for needle, proxy in _SUBSTRINGS:
        if needle in user_agent:
            return proxy
    if user_agent.strip() == _APPLE_EXACT:
        return "apple"
    return None
