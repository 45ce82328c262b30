"""Triton serving: the model repository templates, `freesolo serve prepare|start|stop|status`, the contract that
the gRPC client shares with the server (``serving.contract``), and the client (``serving.client``: torch-free, with
``freesolo infer`` on top)."""
