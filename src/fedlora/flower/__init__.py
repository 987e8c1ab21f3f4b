"""fedlora on Flower: the same algorithms, rounds and outputs as the simulator, across machines.

``fedlora.flower.server:app`` is the ServerApp and ``fedlora.flower.client:app`` the
ClientApp (``pip install fedlora[flower]``). Only this package imports ``flwr``.
See docs/deploy.md.
"""
