"""How far apart the clocks of two machines of a run may be: one tolerance for every timestamp nodes exchange.

hivemind's TokenAuthorizerBase refuses a request whose time is more than a minute off the receiver's clock
(``_MAX_CLIENT_SERVICER_TIME_DIFF``, hivemind/utils/auth.py), so a run cannot work with clocks further apart anyway;
progress records, join proofs and access-token requests use the same minute, so a skewed machine fails in one place
with one message rather than in three with three.
"""

from __future__ import annotations

from hivemind.utils.auth import TokenAuthorizerBase

MAX_CLOCK_SKEW = TokenAuthorizerBase._MAX_CLIENT_SERVICER_TIME_DIFF.total_seconds()  # 60 s in hivemind 1.1.12
