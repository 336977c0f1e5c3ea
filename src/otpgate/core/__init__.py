"""Domain logic: challenges, codes, attempts, budgets and idempotency.

Pure rules over small interfaces (``core.ports``): no HTTP, no SQL. The server calls
``AuthenticationService``; stores and delivery plug in behind the ports.
"""
