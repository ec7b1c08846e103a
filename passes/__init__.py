"""tpcompile.passes: FX passes, graph in, graph out (plus a plan record)."""
