"""Node identities in NATS's own decentralized auth: the operator, account and user JWTs
(``claims``, signed with nkeys) and the fleet's authority that issues, renews and revokes
them (``authority``). docs/security.md says why JWTs, and what one node's credential can do.
"""
