"""tpcompile.runtime: collectives and ops that the rewritten graphs call.

Every op here works in eager code too, so a user can build TP by hand with them.
"""
