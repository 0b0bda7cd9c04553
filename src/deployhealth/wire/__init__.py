"""Pure wire formats: bytes in, values out, no sockets.

Each module parses untrusted input from the network and raises only its own parse error
(`derp.DerpProtocolError`, `stun.StunParseError`) for anything malformed, so callers can
catch exactly one exception per protocol and the property tests can prove nothing else
escapes.
"""
