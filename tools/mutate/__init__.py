"""Mutation testing of the modules that guard money, secrets and data (`make mutate`).

One small change at a time is made to a module (a flipped comparison, a negated condition, a
removed `raise`, an early `return`, a constant off by one, `and`/`or` swapped, ...), the
module's own fast tests run against it, and a change that no test notices is a survivor.
"""
